"""The normalisations as plain torch formulas: the oracle of the Triton kernels and their torch path.

Over the last dimension (D) of any-rank x, computed in float32 (float64 for float64 inputs), returned in x's dtype:

    rms_norm:  y = x / sqrt(mean(x^2) + eps) * weight [* silu(gate)]   (F.rms_norm; with a gate, the norm comes
               before the gate: Qwen3-Next's RMSNormGated, fla's FusedRMSNormGated)
    l2_norm:   y = x / sqrt(sum(x^2) + eps)                              (eps inside the root, as Gated DeltaNet's
               q/k normalisation in Qwen3-Next)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
    """x, gate [..., D]; weight [D] or None -> y [..., D] in x's dtype."""
    dtype = _compute_dtype(x)
    y = F.rms_norm(x.to(dtype), (x.shape[-1],), None if weight is None else weight.to(dtype), eps)
    if gate is not None:
        y = y * F.silu(gate.to(dtype))
    return y.to(x.dtype)


def l2_norm_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> y [..., D] in x's dtype."""
    xc = x.to(_compute_dtype(x))
    return (xc * torch.rsqrt((xc * xc).sum(-1, keepdim=True) + eps)).to(x.dtype)
