"""Argument checks shared by the public gated delta rule functions: one-line ValueErrors naming what is allowed."""
from __future__ import annotations

import torch

from lctrain.kernels.common import check_cu_seqlens, sequence_count

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    """Validate shapes and dtypes; return N, the number of sequences (states)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"q, k, v must be 4-D [B, T, heads, dim]; got {shapes}")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}; got {tuple(k.shape)}")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B={B}, T={T}, HV, V]; got {tuple(v.shape)}")
    if T < 1:
        raise ValueError("the sequence length T must be at least 1")
    if HV % H:
        raise ValueError(f"value heads HV={HV} must be a multiple of query/key heads H={H}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}; got K={K}, V={V}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B={B}, T={T}, HV={HV}]; got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q, k, v must share one dtype among float32, bfloat16, float16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not g.is_floating_point() or not beta.is_floating_point():
        raise ValueError(f"g and beta must be floating point; got {g.dtype}, {beta.dtype}")
    check_cu_seqlens(cu_seqlens, B, T)
    N = sequence_count(B, cu_seqlens)
    if initial_state is not None and initial_state.shape != (N, HV, K, V):
        raise ValueError(f"initial_state must be [N={N}, HV={HV}, K={K}, V={V}]; got {tuple(initial_state.shape)}")
    return N
