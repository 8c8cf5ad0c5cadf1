"""The gated delta rule as a token-by-token loop: the specification of the op and the oracle of its tests.

Per value head (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", Eq. 10), with state S in R^{K x V}:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t,

alpha_t = exp(g_t), scale = K^-1/2 by default. Value head h reads query/key head h // (HV / H).
Slow on purpose: one step per token, in float64 when given float64 inputs (float32 otherwise).
"""
from __future__ import annotations

import torch


def gated_delta_rule_reference(
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
    """q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; initial_state [N, HV, K, V].

    Returns o [B, T, HV, V] (in the compute dtype: float64 for float64 inputs, else float32, cast to v's dtype
    when v is lower precision) and, if requested, the final states [N, HV, K, V] in the compute dtype.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    dtype = torch.promote_types(v.dtype, torch.float32)
    scale = K**-0.5 if scale is None else scale
    group = HV // H
    q, k = (x.to(dtype).repeat_interleave(group, dim=2) for x in (q, k))
    v, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(B)]  # rows[b][t] = o[b, t], filled in order of t
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            S = initial_state[n].to(dtype)
        else:
            S = torch.zeros(HV, K, V, dtype=dtype, device=v.device)
        for t in range(start, end):
            kt, vt, bt = k[b, t], v[b, t], beta[b, t, :, None, None]
            # alpha (I - beta k k^T) S + beta k v^T, written without forming the K x K matrix
            S = g[b, t].exp()[:, None, None] * (S - bt * kt[:, :, None] * (kt[:, None, :] @ S))
            S = S + bt * kt[:, :, None] * vt[:, None, :]
            rows[b].append(scale * (q[b, t][:, None, :] @ S).squeeze(1))
        finals.append(S)
    o = torch.stack([torch.stack(r) for r in rows])
    if torch.finfo(out_dtype).bits < 32:
        o = o.to(out_dtype)
    final = torch.stack(finals) if output_final_state else None
    return o, final
