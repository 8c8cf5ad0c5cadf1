"""GSA and gated linear attention kernels on CPU: the Triton kernels under the interpreter (float32) and the torch path,
each against the float64 recurrent loops of kernels/gsa/reference.py through kernel_checks.compare_with_reference
(outputs poisoned; values, final states and every gradient, initial states included, within 1e-4).

Dimensions are small and K != V != M so that a swapped axis cannot pass; UNIT_CHUNKS = 1 or 2 forces the split of a
sequence into units (the GPU's in-sequence parallel scan), which CPU runs would otherwise never take.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lctrain.kernels.gsa.chunk as gsa_chunk
from lctrain.kernels.gsa import chunk_gated_linear_attention, chunk_gsa, fused_recurrent_gsa
from lctrain.kernels.gsa.reference import recurrent_gated_linear_attention, recurrent_gsa
from kernel_checks import compare_with_reference

TOL = 1e-4
K, V, M = 32, 16, 8


def gsa_inputs(B, T, H=1, seed=0, docs=None, init=True, gate=None, dims=(K, V, M)):
    """Random GSA inputs as compare_with_reference's dict; docs: document lengths packed along T (B = 1)."""
    k_dim, v_dim, m_dim = dims
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    N = B if docs is None else len(docs)
    x = {"q": randn(B, T, H, k_dim), "k": randn(B, T, H, k_dim), "v": randn(B, T, H, v_dim),
         "s": randn(B, T, H, m_dim),
         "g": F.logsigmoid(randn(B, T, H, m_dim)) if gate is None else gate(randn(B, T, H, m_dim))}
    if init:
        x["hk0"], x["hv0"] = randn(N, H, k_dim, m_dim), randn(N, H, m_dim, v_dim)
    if docs is not None:
        x["cu_seqlens"] = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int64)
    return x


def gsa_op(fn, final):
    def run(q, k, v, s, g, hk0=None, hv0=None, cu_seqlens=None):
        state = None if hk0 is None else (hk0, hv0)
        return fn(q, k, v, s, g, initial_state=state, output_final_state=final, cu_seqlens=cu_seqlens)
    return run


@pytest.fixture
def units(monkeypatch):
    """Chunks per sequential unit for one test (None: one unit per sequence)."""
    def set_units(n):
        monkeypatch.setattr(gsa_chunk, "UNIT_CHUNKS", n)
    return set_units


@pytest.fixture(params=["per chunk", "sub-blocks"])
def intra_path(request, monkeypatch):
    """The intra-chunk factorisation: as chosen per chunk (logsigmoid(randn) gates fall by ~40-47 across a full
    chunk: one product through one reference; strong gates take the sub-blocks), or the sub-blocks for every chunk."""
    if request.param == "sub-blocks":
        monkeypatch.setattr(gsa_chunk, "GAP_LIMIT", -1.0)
    return request.param


@pytest.mark.parametrize("B,T,H,init,final,unit", [
    (1, 1, 1, True, True, None),
    (2, 17, 1, False, True, None),
    (1, 64, 2, True, False, None),
    (1, 65, 1, True, True, 1),
    (1, 130, 1, False, True, 2),
])
def test_chunk_gsa(B, T, H, init, final, unit, units):
    units(unit)
    compare_with_reference(gsa_op(chunk_gsa, final), gsa_op(recurrent_gsa, final),
                           gsa_inputs(B, T, H, seed=T, init=init), TOL)


@pytest.mark.parametrize("unit", [None, 1])
def test_chunk_gsa_varlen(unit, units, intra_path):
    units(unit)
    docs = [1, 5, 0, 64, 70]  # and an empty document
    compare_with_reference(gsa_op(chunk_gsa, True), gsa_op(recurrent_gsa, True),
                           gsa_inputs(1, sum(docs), docs=docs), TOL)


@pytest.mark.parametrize("gate", [
    lambda x: F.logsigmoid(30 * x - 10),  # mixes open gates with exp(g) ~ 1e-13 .. 1e-17
    lambda x: F.logsigmoid(40 * x - 400) / 8,  # logsigmoid of large negative values with the paper's damping
    lambda x: torch.full_like(x, -1e4),  # a reset at every token
])
def test_strong_gates(gate):
    """No NaN/inf anywhere, and the usual accuracy. Once the gates shut, the true dg vanishes (~e^-50) while float32
    leaves ~1e-7 of the terms it cancels, so dg's error is measured against unit-size gradients (floor sqrt(numel))."""
    x = gsa_inputs(1, 70, seed=3, gate=gate)
    compare_with_reference(gsa_op(chunk_gsa, True), gsa_op(recurrent_gsa, True), x, TOL,
                           grad_floors={"g": x["g"].numel() ** 0.5})


def test_torch_path(monkeypatch):
    """CPU without the interpreter: chunk_gsa and fused_recurrent_gsa fall back to the chunkwise torch code."""
    monkeypatch.setattr(gsa_chunk, "use_triton", lambda x: False)
    monkeypatch.setattr(sys.modules["lctrain.kernels.gsa.fused_recurrent"], "use_triton", lambda x: False)
    docs = [1, 17, 40]
    for fn in (chunk_gsa, fused_recurrent_gsa):
        compare_with_reference(gsa_op(fn, True), gsa_op(recurrent_gsa, True),
                               gsa_inputs(1, sum(docs), H=2, docs=docs), TOL)
    compare_with_reference(gsa_op(chunk_gsa, False), gsa_op(recurrent_gsa, False),
                           gsa_inputs(2, 33, init=False, gate=lambda x: F.logsigmoid(30 * x - 10)), TOL,
                           grad_floors={"g": (2 * 33 * M) ** 0.5})


@pytest.mark.parametrize("docs", [None, [3, 1, 9]])
def test_fused_recurrent_gsa(docs):
    T = 13 if docs is None else sum(docs)
    compare_with_reference(gsa_op(fused_recurrent_gsa, True), gsa_op(recurrent_gsa, True),
                           gsa_inputs(2 if docs is None else 1, T, docs=docs), TOL)


def gla_op(fn, gate_on, final=True):
    def run(q, k, v, g, h0=None, cu_seqlens=None):
        return fn(q, k, v, g, scale=0.7, initial_state=h0, output_final_state=final, cu_seqlens=cu_seqlens,
                  gate_on=gate_on)
    return run


@pytest.mark.parametrize("gate_on,T,unit,docs", [
    ("key", 65, 1, None),
    ("value", 65, 1, None),
    ("key", 75, None, [1, 64, 10]),
    ("value", 75, None, [1, 64, 10]),
])
def test_chunk_gated_linear_attention(gate_on, T, unit, docs, units, intra_path):
    units(unit)
    gen = torch.Generator().manual_seed(T)
    N = 1 if docs is None else len(docs)
    x = {"q": torch.randn(1, T, 1, K, generator=gen), "k": torch.randn(1, T, 1, K, generator=gen),
         "v": torch.randn(1, T, 1, V, generator=gen),
         "g": F.logsigmoid(torch.randn(1, T, 1, K if gate_on == "key" else V, generator=gen)),
         "h0": torch.randn(N, 1, K, V, generator=gen)}
    if docs is not None:
        x["cu_seqlens"] = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()])
    compare_with_reference(gla_op(chunk_gated_linear_attention, gate_on), gla_op(recurrent_gated_linear_attention,
                                                                                  gate_on), x, TOL)


def test_gated_linear_attention_scalar_decay():
    """Mamba2's use: one decay per head broadcast over K; the gradient reaches the per-head decay."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, N, P = 2, 20, 1, 32, 16
    x = {"q": torch.randn(B, T, H, N, generator=gen), "k": torch.randn(B, T, H, N, generator=gen),
         "v": torch.randn(B, T, H, P, generator=gen), "a": -F.softplus(torch.randn(B, T, H, generator=gen))}

    def op(fn):
        def run(q, k, v, a):
            return fn(q, k, v, a[..., None].expand(B, T, H, N), scale=1.0, output_final_state=True)
        return run

    compare_with_reference(op(chunk_gated_linear_attention), op(recurrent_gated_linear_attention), x, TOL)


def test_deferred_chunks_mixed_with_common_ones():
    """Sub-block chunks and one-product chunks in one launch pair: strong gates on one head's second chunk and one of
    the two 64-column blocks of the gated dim (V = 80), damped gates elsewhere, so the common launch defers some
    (chunk, head, column block) items to the device list and does the rest, in the forward and every backward call."""
    gen = torch.Generator().manual_seed(7)
    T, H, v_dim = 130, 2, 80
    g = F.logsigmoid(torch.randn(1, T, H, v_dim, generator=gen)) / 4  # drops ~15 per chunk
    g[:, 64:128, 1, 64:] = F.logsigmoid(30 * torch.randn(1, 64, v_dim - 64, generator=gen) - 10)
    chunk_drops = -g[0, :128].view(2, 64, H, v_dim)[:, 1:].sum(1)  # [chunk, head, column]
    blocks = torch.stack([chunk_drops[..., :64].amax(-1), chunk_drops[..., 64:].amax(-1)], -1)  # [chunk, head, block]
    rare = blocks > gsa_chunk.GAP_LIMIT
    assert rare.sum() == 1 and bool(rare[1, 1, 1])
    x = {"q": torch.randn(1, T, H, K, generator=gen), "k": torch.randn(1, T, H, K, generator=gen),
         "v": torch.randn(1, T, H, v_dim, generator=gen), "g": g, "h0": torch.randn(1, H, K, v_dim, generator=gen)}
    compare_with_reference(gla_op(chunk_gated_linear_attention, "value"),
                           gla_op(recurrent_gated_linear_attention, "value"), x, TOL)


def test_recomputed_states(monkeypatch):
    """KEEP_FORWARD_STATES off: the backward recomputes the boundary states from the units' initial states (split
    sequences, documents); the gradients equal those from the kept states exactly (same kernels, same inputs)."""
    docs = [5, 64, 70]
    x = gsa_inputs(1, sum(docs), docs=docs)
    monkeypatch.setattr(gsa_chunk, "UNIT_CHUNKS", 1)
    grads = {}
    for keep in (True, False):
        monkeypatch.setattr(gsa_chunk, "KEEP_FORWARD_STATES", keep)
        leaves = {name: t.clone().requires_grad_(name != "cu_seqlens") for name, t in x.items()}
        o, (hk, hv) = gsa_op(chunk_gsa, True)(**leaves)
        (o.sum() + hk.square().sum() + hv.sum()).backward()
        grads[keep] = {name: t.grad for name, t in leaves.items() if t.requires_grad}
    for name, grad in grads[True].items():
        assert torch.equal(grad, grads[False][name]), name
    compare_with_reference(gsa_op(chunk_gsa, True), gsa_op(recurrent_gsa, True), x, TOL)


def test_transposed_key_gate_scans(monkeypatch):
    """KEY_GATE_SCAN_TRANSPOSED: the value pass's scans carry S^T (every kind: units, boundary states, the gate
    gradient's pair term); documents of odd lengths split into units of one chunk, initial states; an unknown kind is
    refused."""
    docs = [5, 64, 70]
    monkeypatch.setattr(gsa_chunk, "UNIT_CHUNKS", 1)
    monkeypatch.setattr(gsa_chunk, "KEY_GATE_SCAN_TRANSPOSED", frozenset({"units", "states", "pair"}))
    compare_with_reference(gsa_op(chunk_gsa, True), gsa_op(recurrent_gsa, True),
                           gsa_inputs(1, sum(docs), H=2, docs=docs), TOL)
    monkeypatch.setattr(gsa_chunk, "KEY_GATE_SCAN_TRANSPOSED", frozenset({"unit"}))
    x = gsa_inputs(1, 8)
    with pytest.raises(ValueError, match="KEY_GATE_SCAN_TRANSPOSED"):
        chunk_gsa(x["q"], x["k"], x["v"], x["s"], x["g"])


@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 70), H=st.just(1), k_dim=st.sampled_from([16, 24, 40]),
       v_dim=st.sampled_from([8, 20]), m_dim=st.sampled_from([4, 16, 17]), init=st.booleans(), final=st.booleans(),
       unit=st.sampled_from([None, 1]), seed=st.integers(0, 2**16))
def test_chunk_gsa_shapes(B, T, H, k_dim, v_dim, m_dim, init, final, unit, seed):
    previous, gsa_chunk.UNIT_CHUNKS = gsa_chunk.UNIT_CHUNKS, unit
    try:
        compare_with_reference(gsa_op(chunk_gsa, final), gsa_op(recurrent_gsa, final),
                               gsa_inputs(B, T, H, seed=seed, init=init, dims=(k_dim, v_dim, m_dim)), TOL)
    finally:
        gsa_chunk.UNIT_CHUNKS = previous


def test_gate_drop_decides_the_path():
    """The tests' ordinary gates (logsigmoid(randn)) fall by less than GAP_LIMIT across a full chunk (one product
    through one reference), test_strong_gates' first case by more (sub-blocks): the default runs exercise both."""
    def drops(g):
        return -g.view(2, 64, M)[:, 1:].sum(1).amax(-1)  # b_first - b_last, largest over the slots

    randn = torch.randn(1, 128, 1, M, generator=torch.Generator().manual_seed(0))
    assert bool((drops(F.logsigmoid(randn)) < gsa_chunk.GAP_LIMIT).all())
    assert bool((drops(F.logsigmoid(30 * randn - 10)) > gsa_chunk.GAP_LIMIT).all())


def test_plan_cache():
    """One plan per shape and setting, and per cu_seqlens tensor until it changes in place."""
    device = torch.device("cpu")
    assert gsa_chunk.make_plan(None, 2, 100, device, 4) is gsa_chunk.make_plan(None, 2, 100, device, 4)
    assert gsa_chunk.make_plan(None, 2, 100, device, 4) is not gsa_chunk.make_plan(None, 2, 101, device, 4)
    cu_seqlens = torch.tensor([0, 30, 100])
    plan = gsa_chunk.make_plan(cu_seqlens, 1, 100, device, 4)
    assert gsa_chunk.make_plan(cu_seqlens, 1, 100, device, 4) is plan
    cu_seqlens[1] = 64
    changed = gsa_chunk.make_plan(cu_seqlens, 1, 100, device, 4)
    assert changed is not plan and changed.chunks[:, 1].tolist() == [64, 36]


def test_bad_inputs():
    x = gsa_inputs(1, 8, init=False)
    q, k, v, s, g = x["q"], x["k"], x["v"], x["s"], x["g"]
    with pytest.raises(ValueError, match="s and g"):
        chunk_gsa(q, k, v, s, g[..., :3])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gsa(q, k, v, s, g, initial_state=(torch.zeros(1, 1, K, M), torch.zeros(1, 1, V, M)))
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_gsa(q, k, v, s, g, cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="gate_on"):
        chunk_gated_linear_attention(q, k, v, g, gate_on="slot")
    with pytest.raises(ValueError, match="g must be"):
        chunk_gated_linear_attention(q, k, v, g)
