"""Recurrent loops that define the operators: the oracles of the tests. Run them in float64 for checking.

Gated linear attention (one head; S in R^{K x V}; a gate vector in log space per token):
    gate on the key side    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T        g_t in R^K
    gate on the value side  S_t = S_{t-1} diag(exp g_t) + k_t v_t^T        g_t in R^V
    o_t = scale * S_t^T q_t

Gated Slot Attention (Zhang et al. 2024, "Gated Slot Attention for Efficient Linear-Time Sequence Modeling", eq. 5-6),
M slots, slot writes s_t and slot gates g_t in R^M:
    Hk_t = Hk_{t-1} diag(exp g_t) + k_t s_t^T           Hk in R^{K x M}
    p_t  = softmax(scale * Hk_t^T q_t)                  over the M slots
    Hv_t = diag(exp g_t) Hv_{t-1} + s_t v_t^T           Hv in R^{M x V}
    o_t  = Hv_t^T p_t

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M]; states [N, H, ...] with N = B, or N = number of
documents when ``cu_seqlens`` (int64 offsets, B = 1) packs them; each document starts from its own initial state.
"""
from __future__ import annotations

import torch


def _documents(batch: int, length: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first token, end token) of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def recurrent_gated_linear_attention(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, gate_on="key"):
    """Token-by-token gated linear attention in the inputs' dtype.

    Returns (o [B, T, H, V], final [N, H, K, V] or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    rows, times, outputs, finals = [], [], [], []
    for n, (b, start, end) in enumerate(_documents(B, T, cu_seqlens)):
        S = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(q.dtype)
        for t in range(start, end):
            decay = g[b, t].exp()
            S = S * (decay[:, :, None] if gate_on == "key" else decay[:, None, :])
            S = S + k[b, t, :, :, None] * v[b, t, :, None, :]
            rows.append(b)
            times.append(t)
            outputs.append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        finals.append(S)
    o = _scatter(q.new_zeros(B, T, H, V), rows, times, outputs)
    return o, (torch.stack(finals) if output_final_state else None)


def _scatter(o: torch.Tensor, rows: list[int], times: list[int], values: list[torch.Tensor]) -> torch.Tensor:
    """o with o[rows[i], times[i]] = values[i], differentiably."""
    if not values:
        return o
    index = (torch.tensor(rows, device=o.device), torch.tensor(times, device=o.device))
    return o.index_put(index, torch.stack(values))


def recurrent_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token GSA in the inputs' dtype.

    Returns (o [B, T, H, V], (hk [N, H, K, M], hv [N, H, M, V]) or (None, None))."""
    B, T, H, K = q.shape
    M, V = s.shape[-1], v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    rows, times, outputs, finals_k, finals_v = [], [], [], [], []
    for n, (b, start, end) in enumerate(_documents(B, T, cu_seqlens)):
        if initial_state is None:
            hk, hv = q.new_zeros(H, K, M), q.new_zeros(H, M, V)
        else:
            hk, hv = initial_state[0][n].to(q.dtype), initial_state[1][n].to(q.dtype)
        for t in range(start, end):
            decay = g[b, t].exp()  # [H, M]
            hk = hk * decay[:, None, :] + k[b, t, :, :, None] * s[b, t, :, None, :]
            p = torch.softmax(scale * torch.einsum("hk,hkm->hm", q[b, t], hk), dim=-1)
            hv = hv * decay[:, :, None] + s[b, t, :, :, None] * v[b, t, :, None, :]
            rows.append(b)
            times.append(t)
            outputs.append(torch.einsum("hm,hmv->hv", p, hv))
        finals_k.append(hk)
        finals_v.append(hv)
    o = _scatter(q.new_zeros(B, T, H, V), rows, times, outputs)
    if not output_final_state:
        return o, (None, None)
    return o, (torch.stack(finals_k), torch.stack(finals_v))
