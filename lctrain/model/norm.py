"""RMSNorm (pre-norm blocks, final norm, q/k norms) and the SiLU-gated RMSNorm of the recurrent mixers' outputs.

Both run ``lctrain.kernels.norm.rms_norm``: one fused Triton kernel (float32 statistics, input-dtype output) on GPU,
the float32 torch formula otherwise. The weight of every norm is shared across tensor-parallel ranks (it spans a
full hidden vector, or one head's channels), so it is replicated, not sharded.
"""
from __future__ import annotations

import torch

from lctrain.kernels.norm import rms_norm


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """y = RMSNorm(x) * silu(gate) over the last dimension (one head's channels): Gated DeltaNet's output norm
    (Qwen3-Next's RMSNormGated, norm before gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gate=gate)
