"""Token-by-token GSA in Triton, for decoding a few tokens with carried states.

Each program keeps one [BK, BV] block of a gated linear-attention state in registers and steps through its
sequence's tokens (see reference.py): S <- S * exp(g_t) (rows with the gate on the keys, columns with it on the
values) + k_t v_t^T, o_t = scale * S^T q_t. The output's sum over K is split over programs and added afterwards.
GSA runs it twice, with the softmax between. The backward is the chunkwise one (the same function, so the same
gradients): recurrent decoding rarely needs gradients, and when it does the chunk kernels are the faster way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import new_output, use_triton
from .chunk import (ChunkGSAFunction, check_gsa_inputs, chunk_cumsum, float_state, make_plan, slot_softmax,
                    unit_initial_states)
from .chunk_torch import gsa_chunk_torch


@triton.jit(do_not_specialize=["n_tokens"])
def _recurrent_gla_kernel(q, k, v, g, init, out, final, bounds, scale, n_tokens,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          GATE_KEY: tl.constexpr, HAS_INIT: tl.constexpr):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(bounds + i_n).to(tl.int64)
    eos = tl.load(bounds + i_n + 1).to(tl.int64)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    state_offs = (i_n * H + i_h) * K * V + rk[:, None] * V + rv[None, :]
    state_mask = mk[:, None] & mv[None, :]
    if HAS_INIT:
        S = tl.load(init + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        tok = t * H + i_h
        q_t = tl.load(q + tok * K + rk, mask=mk, other=0.0).to(tl.float32)
        k_t = tl.load(k + tok * K + rk, mask=mk, other=0.0).to(tl.float32)
        v_t = tl.load(v + tok * V + rv, mask=mv, other=0.0).to(tl.float32)
        if GATE_KEY:
            S = S * tl.exp(tl.load(g + tok * K + rk, mask=mk, other=0.0).to(tl.float32))[:, None]
        else:
            S = S * tl.exp(tl.load(g + tok * V + rv, mask=mv, other=0.0).to(tl.float32))[None, :]
        S += k_t[:, None] * v_t[None, :]
        o_t = scale * tl.sum(S * q_t[:, None], axis=0)
        tl.store(out + (i_k * n_tokens + t) * H * V + i_h * V + rv, o_t, mask=mv)
    tl.store(final + state_offs, S, mask=state_mask)


def recurrent_gla(q, k, v, g, scale, h0, bounds, gate_key: bool, out_dtype):
    """Gated linear attention token by token; bounds: int64 [N + 1] token offsets of the sequences in [B*T]."""
    B, T, H, K = q.shape
    V = v.shape[3]
    N = bounds.numel() - 1
    BK, BV = min(64, max(16, triton.next_power_of_2(K))), min(64, max(16, triton.next_power_of_2(V)))
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    partial = new_output((NK, B, T, H, V), torch.float32, q.device)
    final = new_output((N, H, K, V), torch.float32, q.device)
    _recurrent_gla_kernel[(NK, NV, N * H)](q, k, v, g, q if h0 is None else h0, partial, final, bounds, scale,
                                           B * T, H=H, K=K, V=V, BK=BK, BV=BV, GATE_KEY=gate_key,
                                           HAS_INIT=h0 is not None)
    return partial.sum(0).to(out_dtype), final


class FusedRecurrentGSAFunction(ChunkGSAFunction):
    """Forward token by token; backward inherited from the chunkwise function (it needs the same saved tensors, here
    those that recompute the boundary states: ChunkGSAFunction without KEEP_FORWARD_STATES)."""

    @staticmethod
    def forward(ctx, q, k, v, s, g, scale, hk0, hv0, cu_seqlens):
        B, T, H, K = q.shape
        M, V = s.shape[3], v.shape[3]
        if cu_seqlens is None:
            bounds = torch.arange(B + 1, device=q.device, dtype=torch.int64) * T
        else:
            bounds = cu_seqlens.to(device=q.device, dtype=torch.int64)
        scores, hk = recurrent_gla(q, k, s, g, scale, hk0, bounds, False, torch.float32)
        p = slot_softmax(scores, q.dtype)
        o, hv = recurrent_gla(p, s, v, g, 1.0, hv0, bounds, True, v.dtype)
        unit_init_k, unit_init_v = hk0, hv0
        ctx.plan = None
        if any(ctx.needs_input_grad):  # what the chunkwise backward starts from
            ctx.plan = make_plan(cu_seqlens, B, T, q.device, H * triton.cdiv(M, 64) * triton.cdiv(max(K, V), 64))
            gc = chunk_cumsum(g, ctx.plan)
            unit_init_k = unit_initial_states(k, s, gc, hk0, ctx.plan, False, reverse=False, scale=1.0)
            unit_init_v = unit_initial_states(s, v, gc, hv0, ctx.plan, True, reverse=False, scale=1.0)
        ctx.save_for_backward(q, k, v, s, scores, None, g, unit_init_k, unit_init_v)
        ctx.scale, ctx.has_h0 = scale, (hk0 is not None, hv0 is not None)
        ctx.keep, ctx.g_dtype = False, g.dtype
        ctx.set_materialize_grads(False)
        return o, hk, hv


def fused_recurrent_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated Slot Attention token by token (decoding); same signature, shapes and results as ``chunk_gsa``."""
    check_gsa_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    if use_triton(q):
        o, hk, hv = FusedRecurrentGSAFunction.apply(
            q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(), scale, float_state(hk0),
            float_state(hv0), cu_seqlens)
    else:
        o, hk, hv = gsa_chunk_torch(q, k, v, s, g, scale, initial_state, cu_seqlens)
    return o, ((hk, hv) if output_final_state else (None, None))
