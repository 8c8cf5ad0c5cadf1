"""Rotary position embedding (RoPE, rotate-half convention) on the first rot_dim channels of x [..., L, H, D] at
integer positions [..., L], fused in Triton (fused.py) with the torch formula as oracle (reference.py). With
half = rot_dim / 2, pairs (x_j, x_{j + half}) for j < half turn by angle = position * theta^(-2j / rot_dim):

    y_j = x_j cos - x_{j + half} sin,   y_{j + half} = x_{j + half} cos + x_j sin,   y_c = x_c for c >= rot_dim

in float32 (float64 for float64 inputs), output in x's dtype; the backward is the rotation by -angle.

    rope(x, positions, rot_dim, theta)            Triton forward and backward where ``use_triton``; the torch formula elsewhere
    rope_reference(x, positions, rot_dim, theta)  the formula in float32 (float64 for float64 inputs): the oracle and the torch path
"""
from lctrain.kernels.rope.fused import rope
from lctrain.kernels.rope.reference import rope_reference

__all__ = ["rope", "rope_reference"]
