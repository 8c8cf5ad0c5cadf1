"""Token-by-token gated delta rule for decoding a few tokens with a carried state (one Triton program per
sequence, value head and block of state columns; the state stays in registers across the tokens).

Per token: S <- exp(g) S;  vn = beta (v - S^T k);  S <- S + k vn^T;  o = scale S^T q  (the same recurrence as
reference.py, with the delta rule's correction computed from the decayed state). The backward, rarely needed
when decoding, runs the chunkwise backward kernels of chunk.py on the same inputs: the same function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lctrain.kernels.common import new_output, use_triton
from lctrain.kernels.gated_delta.checks import check_inputs
from lctrain.kernels.gated_delta.chunk import build_layout, chunk_backward, forward_states
from lctrain.kernels.gated_delta.chunk_torch import chunk_gated_delta_rule_torch


@triton.jit
def _fused_recurrent_kernel(q, k, v, g, beta, o, initial_state, final, bounds, scale,
                            H, HV, K: tl.constexpr, V: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
    n, i_hv, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos = tl.load(bounds + n * 2).to(tl.int64)
    eos = tl.load(bounds + n * 2 + 1).to(tl.int64)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    kmask, vmask = rk < K, cv < V
    state_at = ((n * HV + i_hv) * K + rk[:, None]) * V + cv[None, :]
    if HAS_INIT:
        S = tl.load(initial_state + state_at, mask=kmask[:, None] & vmask[None, :], other=0.0)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + rk, mask=kmask, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + rk, mask=kmask, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * HV + i_hv) * V + cv, mask=vmask, other=0.0).to(tl.float32)
        b_g = tl.load(g + t * HV + i_hv)
        b_beta = tl.load(beta + t * HV + i_hv)
        S = S * tl.exp(b_g)
        b_vn = b_beta * (b_v - tl.sum(S * b_k[:, None], axis=0))
        S += b_k[:, None] * b_vn[None, :]
        b_o = scale * tl.sum(S * b_q[:, None], axis=0)
        tl.store(o + (t * HV + i_hv) * V + cv, b_o.to(o.dtype.element_ty), mask=vmask)
    if STORE_FINAL:
        tl.store(final + state_at, S, mask=kmask[:, None] & vmask[None, :])


class FusedRecurrentGatedDeltaRule(torch.autograd.Function):
    """Forward by the recurrent kernel; backward by the chunkwise kernels."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        if cu_seqlens is None:
            starts = torch.arange(B, device=q.device, dtype=torch.int64) * T
            bounds = torch.stack([starts, starts + T], dim=1)
        else:
            bounds = torch.stack([cu_seqlens[:-1], cu_seqlens[1:]], dim=1)
        bounds = bounds.to(device=q.device, dtype=torch.int32).contiguous()
        N = bounds.shape[0]
        o = new_output((B, T, HV, V), v.dtype, q.device)
        final = new_output((N, HV, K, V), torch.float32, q.device) if output_final_state else None
        BK = max(16, triton.next_power_of_2(K))
        BV = max(16, min(64, triton.next_power_of_2(V), 8192 // BK))
        _fused_recurrent_kernel[(N, HV, triton.cdiv(V, BV))](
            q, k, v, g, beta, o, initial_state if initial_state is not None else o,
            final if final is not None else o, bounds, scale, H, HV,
            K=K, V=V, BK=BK, BV=BV, HAS_INIT=initial_state is not None, STORE_FINAL=final is not None,
            num_warps=4 if BK * BV <= 4096 else 8)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        layout = build_layout(B, T, cu_seqlens, q.device, None, HV)
        kept, _, seg_init, summary = forward_states(k, v, g, beta, initial_state, False, layout)
        dq, dk, dv, dbeta, dg, dh0 = chunk_backward(
            q, k, v, g, beta, ctx.scale, kept, seg_init, summary, do.contiguous(),
            None if dht is None else dht.contiguous(), layout, want_dh0=initial_state is not None)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments, shapes and results as ``chunk_gated_delta_rule``; made for decoding one or a few tokens
    from a carried ``initial_state`` (its cost grows with T one token at a time). Without Triton (CPU, no
    interpreter) it runs the torch chunkwise implementation."""
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(q):
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return FusedRecurrentGatedDeltaRule.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                                              beta.float().contiguous(), scale, h0, output_final_state, cu_seqlens)
