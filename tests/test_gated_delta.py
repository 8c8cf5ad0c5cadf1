"""Gated delta rule kernels against the float64 token loop (kernels/gated_delta/reference.py), on CPU.

The Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) with float32 inputs; every output and every
input gradient (final states included, through random cotangents) must be within 1e-4 relative error, with the
kernels' outputs poisoned (tests/kernel_checks.py). ``segment_chunks`` is set small so that short sequences still
cross the segment summaries and their composition, the path long sequences take on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_checks import compare_with_reference
from lctrain.kernels.gated_delta import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                         gated_delta_rule_reference)
from lctrain.kernels.gated_delta import chunk as chunk_module
from lctrain.kernels.gated_delta.chunk import chunk_gated_delta_rule_triton
from lctrain.kernels.gated_delta.chunk_torch import chunk_gated_delta_rule_torch

TOL = 1e-4
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def make_inputs(B, T, H, HV, K, V, N=None, initial_state=True, seed=0, dtype=torch.float32):
    """Random inputs in the operating range of the layer: unit-norm keys, beta in (0, 1), decays near 1."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return dict(
        q=randn(B, T, H, K),
        k=F.normalize(randn(B, T, H, K), dim=-1),
        v=randn(B, T, HV, V),
        g=F.logsigmoid(randn(B, T, HV) + 3.0),
        beta=torch.rand(B, T, HV, generator=gen, dtype=dtype),
        initial_state=randn(N or B, HV, K, V) if initial_state else None,
    )


def check(fast, inputs, cu_seqlens=None, output_final_state=True, scale=None):
    def run_fast(q, k, v, g, beta, initial_state):
        return fast(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)

    def run_reference(q, k, v, g, beta, initial_state):
        return gated_delta_rule_reference(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)

    return compare_with_reference(run_fast, run_reference, inputs, TOL)


def triton_segmented(segment_chunks):
    def fast(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                             segment_chunks)
    return fast


def public(fn):
    def fast(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    return fast


@pytest.mark.parametrize("B, T", [(2, 1), (2, 17), (1, 64), (2, 65), (1, 130)])
def test_chunk_lengths(B, T):
    """H != HV and K != V, initial and final states, several chunks in one segment (segments: next test)."""
    check(public(chunk_gated_delta_rule), make_inputs(B, T, 1, 2, 32, 16, seed=T))


@pytest.mark.parametrize("segment_chunks, keep", [(1, True), (2, False)])
def test_chunk_segments(segment_chunks, keep, monkeypatch):
    """Segments of one or two chunks: summaries [M | E], their fold, and the reversed fold in the backward; with
    the forward's states kept for the backward, and recomputed there."""
    monkeypatch.setattr(chunk_module, "KEEP_FORWARD_STATES", keep)
    check(triton_segmented(segment_chunks), make_inputs(1, 150, 1, 2, 16, 32, seed=segment_chunks))


@pytest.mark.parametrize("K, V", [(256, 256), (256, 48)])
def test_chunk_widest_heads(K, V):
    """The widest heads the op accepts (checks.MAX_HEAD_DIM = 256): 256-wide key tiles, value tiles narrowed so that
    a program's K x columns state tile stays within 128 x 64 (chunk._tuned), two chunks."""
    check(public(chunk_gated_delta_rule), make_inputs(1, 70, 1, 1, K, V, seed=K + V))


def test_chunk_fused_gradient_kernel(monkeypatch):
    """chunk.FUSED_GRADS: both halves of the input gradients in one program per (chunk, value head)
    (_grads_kernel) instead of _grads_qk_kernel then _grads_wy_kernel; every gradient, the states' included, against
    the reference. Packed documents of 1, 5, 64, 0 and 71 tokens (odd T) over segments of one chunk, grouped heads,
    K != V."""
    monkeypatch.setattr(chunk_module, "FUSED_GRADS", True)
    launched = []
    launch = chunk_module._launch

    def record(kernel, *args, **kwargs):
        launched.append(kernel)
        launch(kernel, *args, **kwargs)

    monkeypatch.setattr(chunk_module, "_launch", record)
    cu = torch.tensor([0, 1, 6, 70, 70, 141], dtype=torch.int64)
    check(triton_segmented(1), make_inputs(1, 141, 1, 2, 16, 32, N=5, seed=13), cu_seqlens=cu)
    assert chunk_module._grads_kernel in launched
    assert chunk_module._grads_qk_kernel not in launched and chunk_module._grads_wy_kernel not in launched


def test_chunk_without_states():
    check(public(chunk_gated_delta_rule), make_inputs(1, 130, 2, 2, 16, 16, initial_state=False),
          output_final_state=False, scale=0.3)


@pytest.mark.parametrize("segment_chunks", [None, 1])
def test_chunk_varlen(segment_chunks):
    """Packed documents of 1, 5, 64 and 70 tokens, and an empty one whose final state is its initial state."""
    cu = torch.tensor([0, 1, 6, 70, 70, 140], dtype=torch.int64)
    check(triton_segmented(segment_chunks), make_inputs(1, 140, 1, 2, 16, 32, N=5, seed=3), cu_seqlens=cu)


def test_chunk_context_parallel_slice():
    """A context-parallel rank's call (GatedDeltaRecurrence.entry_pass): its first document continues an earlier
    rank's (initial state [0 | I], values [v | 0] of width V + K = 24), then a 1-token document, a partial last chunk
    and a row of its own; grouped heads, segments of one chunk. The layout of 2 GPUs' rank 1 in the GPU equality
    test, scaled down; conftest's bounds check covers every load and store."""
    cu = torch.tensor([0, 100, 101, 160, 320], dtype=torch.int64)
    x = make_inputs(1, 320, 2, 4, 16, 24, N=4, seed=11)
    x["v"][..., 8:] = 0
    x["initial_state"] = torch.cat([torch.zeros(4, 4, 16, 8), torch.eye(16).expand(4, 4, 16, 16)], -1)
    x["initial_state"][1:] = 0
    check(triton_segmented(1), x, cu_seqlens=cu)


def test_torch_path():
    """The CPU path without Triton (what the demo trains with), varlen and batched."""
    check(chunk_gated_delta_rule_torch, make_inputs(2, 130, 1, 2, 32, 16, seed=4))
    cu = torch.tensor([0, 1, 6, 70, 140], dtype=torch.int64)
    check(chunk_gated_delta_rule_torch, make_inputs(1, 140, 2, 4, 16, 32, N=4, seed=5), cu_seqlens=cu)


def test_public_function_uses_torch_path_without_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs(1, 70, 1, 1, 16, 16, seed=6)
    o, final = chunk_gated_delta_rule(**x, output_final_state=True)
    ref_o, ref_final = chunk_gated_delta_rule_torch(x["q"], x["k"], x["v"], x["g"], x["beta"], 16**-0.5,
                                                    x["initial_state"], True, None)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 3, 33])
def test_fused_recurrent(T):
    """Decoding: the recurrent kernel's values; its gradients come from the chunk backward."""
    check(public(fused_recurrent_gated_delta_rule), make_inputs(2, T, 1, 2, 16, 32, seed=10 + T))
    cu = torch.tensor([0, 1, T + 1], dtype=torch.int64)
    check(public(fused_recurrent_gated_delta_rule), make_inputs(1, T + 1, 1, 2, 32, 16, N=2, seed=20 + T),
          cu_seqlens=cu)


def transition_and_offset(q, k, v, g, beta, initial_state=None):
    """The boundary map S -> M S + E of a stretch of tokens, as context parallelism obtains it from the public
    function: M from values 0 (width K) and the identity as initial state, E from the true values and state 0."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    eye = torch.eye(K).expand(B, HV, K, K).contiguous()
    _, M = chunk_gated_delta_rule(q, k, v.new_zeros(B, T, HV, K), g, beta, initial_state=eye, output_final_state=True)
    _, E = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    return M, E


def test_transition_composes():
    """Two halves folded with S_in2 = M1 S_in1 + E1 give the full run's output and final state, and gradients
    flow through the transitions as context parallelism takes them."""
    x = make_inputs(1, 150, 1, 2, 16, 32, seed=7)
    names = "q k v g beta".split()
    leaves = {n: x[n].clone().requires_grad_() for n in names + ["initial_state"]}
    half = 70
    first = {n: leaves[n][:, :half] for n in names}
    second = {n: leaves[n][:, half:] for n in names}
    M1, E1 = transition_and_offset(**first)
    S_mid = M1 @ leaves["initial_state"] + E1
    o2, final = chunk_gated_delta_rule(**second, initial_state=S_mid, output_final_state=True)
    o1, _ = chunk_gated_delta_rule(**first, initial_state=leaves["initial_state"])
    full = {n: x[n].clone().requires_grad_() for n in names + ["initial_state"]}
    ref_o, ref_final = gated_delta_rule_reference(**{n: t.double() for n, t in full.items()}, output_final_state=True)
    o = torch.cat([o1, o2], dim=1)
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-4, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    do, dfinal = torch.randn(o.shape, generator=gen), torch.randn(final.shape, generator=gen)
    torch.autograd.backward([o, final], [do, dfinal])
    torch.autograd.backward([ref_o, ref_final], [do.double(), dfinal.double()])
    for n in names + ["initial_state"]:
        err = (leaves[n].grad.double() - full[n].grad).norm() / full[n].grad.norm()
        assert err < TOL, f"gradient of {n} through the composed halves: relative error {err:.2e}"


def test_transition_matches_product_of_steps():
    """final_state from (v = 0, initial state I) is prod_t alpha_t (I - beta_t k_t k_t^T), left-multiplied."""
    x = make_inputs(1, 9, 1, 1, 16, 16, initial_state=False, seed=8)
    M, _ = transition_and_offset(x["q"], x["k"], x["v"], x["g"], x["beta"])
    eye = torch.eye(16, dtype=torch.float64)
    P = eye
    for t in range(9):
        kt = x["k"][0, t, 0].double()
        P = x["g"][0, t, 0].double().exp() * (eye - x["beta"][0, t, 0] * torch.outer(kt, kt)) @ P
    torch.testing.assert_close(M[0, 0].double(), P, rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 130), H=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), K=st.sampled_from([16, 24, 32]),
       V=st.sampled_from([16, 20, 32]), initial_state=st.booleans(), segment_chunks=st.sampled_from([None, 1]),
       seed=st.integers(0, 2**16))
def test_shape_fuzz(T, H, group, K, V, initial_state, segment_chunks, seed):
    """Random shapes, head dims that are not powers of two included."""
    if H * group > 2:
        T = min(T, 64)  # keeps the interpreted grid small
    check(triton_segmented(segment_chunks), make_inputs(1, T, H, H * group, K, V, initial_state=initial_state,
                                                         seed=seed))


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule])
def test_bad_inputs(fn):
    x = make_inputs(1, 8, 2, 2, 16, 16, initial_state=False)
    q, k, v, g, beta = (x[n] for n in "q k v g beta".split())
    with pytest.raises(ValueError, match="multiple of"):
        fn(q, k, torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 3), torch.zeros(1, 8, 3))
    with pytest.raises(ValueError, match="<= 256"):
        fn(torch.zeros(1, 8, 2, 512), torch.zeros(1, 8, 2, 512), v, g, beta)
    with pytest.raises(ValueError, match="batch must be 1"):
        fn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), g.expand(2, -1, -1),
           beta.expand(2, -1, -1), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="initial_state must be"):
        fn(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="g must be"):
        fn(q, k, v, g[:, :4], beta)
    with pytest.raises(ValueError, match="k must have"):
        fn(q, k[..., :8], v, g, beta)
