"""GSA and gated linear attention on a GPU: bf16 inputs against the float64 recurrent loops (reference.py) run on the
same GPU, through kernel_checks.compare_with_reference (outputs poisoned; values, final states and every gradient,
initial states included, within 1e-2 relative error). Long sequences (up to 16k tokens, which the kernels split into
units scanned in parallel), packed documents, strongly negative gates, the recurrent kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import compare_with_reference
from lctrain.kernels.gsa import chunk_gated_linear_attention, chunk_gsa, fused_recurrent_gsa
from lctrain.kernels.gsa.reference import recurrent_gated_linear_attention, recurrent_gsa

pytestmark = pytest.mark.gpu
TOL = 1e-2
H, K, V, M = 2, 64, 96, 64


def gsa_inputs(B, T, seed, docs=None, gate=None):
    """The GSA layer's input statistics: g = logsigmoid(.) / 8 (damping), s = 1 - exp(g); bf16, states float32."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    g = F.logsigmoid(randn(B, T, H, M)) / 8 if gate is None else gate(randn(B, T, H, M))
    N = B if docs is None else len(docs)
    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V), "s": 1 - g.exp(), "g": g}
    x = {name: t.bfloat16() for name, t in x.items()}
    x["hk0"], x["hv0"] = randn(N, H, K, M), randn(N, H, M, V)
    if docs is not None:
        x["cu_seqlens"] = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device="cuda")
    return x


def gsa_op(fn):
    def run(q, k, v, s, g, hk0, hv0, cu_seqlens=None):
        return fn(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu_seqlens)
    return run


@pytest.mark.parametrize("T", [1000, 16384])
def test_gsa_long(T):
    print(compare_with_reference(gsa_op(chunk_gsa), gsa_op(recurrent_gsa), gsa_inputs(1, T, seed=T), TOL))


def test_gsa_varlen():
    docs = [1, 63, 64, 65, 3000, 7, 4900]
    print(compare_with_reference(gsa_op(chunk_gsa), gsa_op(recurrent_gsa), gsa_inputs(1, sum(docs), 1, docs), TOL))


def test_gsa_transposed_key_gate_scans(monkeypatch):
    """KEY_GATE_SCAN_TRANSPOSED with every kind (the value pass's scans carry S^T; V = 96: a masked column block)."""
    import lctrain.kernels.gsa.chunk as gsa_chunk

    monkeypatch.setattr(gsa_chunk, "KEY_GATE_SCAN_TRANSPOSED", frozenset({"units", "states", "pair"}))
    docs = [1, 63, 64, 65, 3000, 7, 4900, 8192]
    print(compare_with_reference(gsa_op(chunk_gsa), gsa_op(recurrent_gsa), gsa_inputs(1, sum(docs), 1, docs), TOL))


def test_gsa_strong_gates():
    """Gates from ~0 to ~-40 per token: finite everywhere; dg against unit-size gradients (see test_gsa.py)."""
    x = gsa_inputs(1, 4096, seed=2, gate=lambda r: F.logsigmoid(30 * r - 10))
    print(compare_with_reference(gsa_op(chunk_gsa), gsa_op(recurrent_gsa), x, TOL,
                                 grad_floors={"g": x["g"].numel() ** 0.5}))


def test_gsa_deferred_chunks():
    """Strong gates in 3 of every 4 chunks (their gate drops exceed GAP_LIMIT: the common launch defers them to the
    device list) and damped ones in the rest: 384 deferred (chunk, head) items per output call, more than the
    sub-block launch's programs (2 per SM), so each program walks several; dg floored as in test_gsa_strong_gates."""
    T = 16384

    def gate(r):
        strong = (torch.arange(T, device=r.device) // 64) % 4 != 0
        return torch.where(strong[None, :, None, None], F.logsigmoid(30 * r - 10), F.logsigmoid(r) / 8)

    x = gsa_inputs(1, T, seed=4, gate=gate)
    print(compare_with_reference(gsa_op(chunk_gsa), gsa_op(recurrent_gsa), x, TOL,
                                 grad_floors={"g": x["g"].numel() ** 0.5}))


def test_fused_recurrent_gsa():
    print(compare_with_reference(gsa_op(fused_recurrent_gsa), gsa_op(recurrent_gsa), gsa_inputs(2, 300, 3), TOL))


@pytest.mark.parametrize("gate_on", ["key", "value"])
def test_gated_linear_attention(gate_on):
    """Shapes of GSA's passes (value gate: K x M state; key gate: M x V), so the compiled kernels are shared."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    T = 8192
    k_dim, v_dim = (M, V) if gate_on == "key" else (K, M)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    x = {"q": randn(1, T, H, k_dim).bfloat16(), "k": randn(1, T, H, k_dim).bfloat16(),
         "v": randn(1, T, H, v_dim).bfloat16(),
         "g": (F.logsigmoid(randn(1, T, H, k_dim if gate_on == "key" else v_dim)) / 8), "h0": randn(1, H, k_dim, v_dim)}

    def op(fn):
        def run(q, k, v, g, h0):
            return fn(q, k, v, g, initial_state=h0, output_final_state=True, gate_on=gate_on)
        return run

    print(compare_with_reference(op(chunk_gated_linear_attention), op(recurrent_gated_linear_attention), x, TOL))


def test_gated_linear_attention_scalar_decay():
    """Mamba2's use: one decay per head (float32) broadcast over K = N; bf16 q, k, v."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    T = 4096
    x = {"q": torch.randn(1, T, H, M, generator=gen, device="cuda").bfloat16(),
         "k": torch.randn(1, T, H, M, generator=gen, device="cuda").bfloat16(),
         "v": torch.randn(1, T, H, V, generator=gen, device="cuda").bfloat16(),
         "a": -F.softplus(torch.randn(1, T, H, generator=gen, device="cuda")) / 4}

    def op(fn):
        def run(q, k, v, a):
            return fn(q, k, v, a[..., None].expand(1, T, H, M), scale=M ** -0.5, output_final_state=True)
        return run

    print(compare_with_reference(op(chunk_gated_linear_attention), op(recurrent_gated_linear_attention), x, TOL))
