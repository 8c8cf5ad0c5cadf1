"""RMSNorm (pre-norm blocks, final norm) and the SiLU-gated RMSNorm of the recurrent mixers' outputs.

The weight of every norm is shared across tensor-parallel ranks (it spans a full hidden vector, or one head's
channels), so it is replicated, not sharded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """y = RMSNorm(x) * silu(gate) over the last dimension (one head's channels): Gated DeltaNet's and Mamba2's
    output norm (Qwen3-Next's RMSNormGated, norm before gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return (normed * F.silu(gate.float())).to(x.dtype)
