"""Rotary position embedding (RoPE) as a plain torch formula: the oracle of the Triton kernels and their torch path.

x [..., L, H, D], positions [..., L] (each token's position inside its document). On the first rot_dim channels
(rotate-half convention: channel i pairs with i + rot_dim/2), with j = 0 .. rot_dim/2 - 1:

    inv_freq_j = 1 / theta^(2j / rot_dim),   angle = position * inv_freq_j
    y[:rot_dim] = x_rot cos + rotate_half(x_rot) sin,   rotate_half([x1; x2]) = [-x2; x1]
    y[rot_dim:] = x[rot_dim:]

computed in float32 (float64 for float64 inputs), returned in x's dtype. This is the formula the attention layer
ran (lctrain/model/attention.py's ``rotary``), kept so that checkpoints and the HF export see the same rotation.
"""
from __future__ import annotations

import torch


def inverse_frequencies(rot_dim: int, theta: float, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """inv_freq_j = 1 / theta^(2j / rot_dim) for j < rot_dim / 2, [rot_dim / 2] in dtype."""
    return 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=dtype) / rot_dim)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, rot_dim: int, theta: float) -> torch.Tensor:
    """x [..., L, H, D], positions [..., L] -> [..., L, H, D] in x's dtype; differentiable in x."""
    if rot_dim == 0:
        return x
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = inverse_frequencies(rot_dim, theta, x.device, compute)
    angles = positions.to(compute)[..., None] * inv_freq  # [..., L, rot_dim / 2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[..., None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[..., None, :]
    x_rot, x_pass = x[..., :rot_dim].to(compute), x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    return torch.cat([(x_rot * cos + rotated * sin).to(x.dtype), x_pass], -1)
