"""The chunkwise gated delta rule in plain torch ops: the path for CPU tensors when Triton cannot run.

Same algorithm as the Triton kernels (chunk.py, whose docstring derives it), vectorised over sequences, heads and
chunks except for the one sequential pass over chunks that carries the state; autograd differentiates it. Fast
enough to train a small model on a CPU (T of a few hundred, a few heads of width 32-64).
"""
from __future__ import annotations

import torch

CHUNK = 64


def _to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor | None, length: int) -> torch.Tensor:
    """[B, T, ...] -> [N, length, ...]: one row per sequence, zero past its end (zeros make identity steps:
    beta = 0 and g = 0 leave the state unchanged, so padding never reaches a final state)."""
    if cu_seqlens is None:
        return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])
    offsets = cu_seqlens.to(device=x.device, dtype=torch.int64)
    position = torch.arange(length, device=x.device)
    index = offsets[:-1, None] + position
    valid = index < offsets[1:, None]
    rows = x[0][index.clamp(max=x.shape[1] - 1)]
    return rows * valid.view(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def _from_padded(x: torch.Tensor, cu_seqlens: torch.Tensor | None, T: int) -> torch.Tensor:
    if cu_seqlens is None:
        return x[:, :T]
    offsets = cu_seqlens.to(device=x.device, dtype=torch.int64)
    valid = torch.arange(x.shape[1], device=x.device) < (offsets[1:] - offsets[:-1])[:, None]
    return x[valid].unsqueeze(0)


def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Shapes as ``chunk_gated_delta_rule``; computes in float32 (float64 for float64 inputs)."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    HV, V = v.shape[2], v.shape[3]
    out_dtype, dtype = v.dtype, torch.promote_types(v.dtype, torch.float32)
    if cu_seqlens is None:
        N, longest = B, T
    else:
        N, longest = cu_seqlens.numel() - 1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    NC = max(1, -(-longest // CHUNK))
    L = NC * CHUNK
    group = HV // H
    q, k = (x.to(dtype).repeat_interleave(group, dim=2) for x in (q, k))

    def chunked(x):  # [B, T, HV, ...] -> [N, HV, NC, CHUNK, ...]
        x = _to_padded(x.to(dtype), cu_seqlens, L)
        x = x.view(N, NC, CHUNK, HV, *x.shape[3:])
        return x.movedim(3, 1)

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    gc = g.cumsum(-1)  # log of the decay from the chunk start to each position
    i = torch.arange(CHUNK, device=q.device)
    strict, incl = i[:, None] > i[None, :], i[:, None] >= i[None, :]
    diff = gc[..., :, None] - gc[..., None, :]
    decay_strict = torch.where(strict, diff, 0).exp() * strict
    decay_incl = torch.where(incl, diff, 0).exp() * incl
    # WY form: (I + A) [w | u] = diag(beta) [k * exp(gc) | v], A_ij = beta_i (k_i . k_j) exp(gc_i - gc_j), i > j
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay_strict
    eye = torch.eye(CHUNK, dtype=dtype, device=q.device)
    rhs = beta[..., None] * torch.cat([k * gc.exp()[..., None], v], dim=-1)
    wu = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]
    attn = (q @ k.transpose(-1, -2)) * decay_incl
    q_decayed = q * gc.exp()[..., None]
    last = gc[..., -1:]
    k_to_end = k * (last - gc).exp()[..., None]
    if initial_state is None:
        S = torch.zeros(N, HV, K, V, dtype=dtype, device=q.device)
    else:
        S = initial_state.to(dtype)
    outputs = []
    for c in range(NC):
        pseudo_v = u[:, :, c] - w[:, :, c] @ S
        outputs.append(scale * (q_decayed[:, :, c] @ S + attn[:, :, c] @ pseudo_v))
        S = last[:, :, c, :, None].exp() * S + k_to_end[:, :, c].transpose(-1, -2) @ pseudo_v
    o = torch.stack(outputs, dim=2).movedim(1, 3).reshape(N, L, HV, V)
    o = _from_padded(o, cu_seqlens, T).to(out_dtype)
    return o, (S if output_final_state else None)
