"""SwiGLU's activation as a plain torch formula: the oracle of the Triton kernels and their torch path.

Over the last dimension of gate_up = [g; u] (the fused gate/up projection's output, 2F wide):

    h = silu(g) * u = g sigmoid(g) u

computed in float32 (float64 for float64 inputs), returned in gate_up's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] -> h [..., F] in gate_up's dtype; differentiable."""
    gate, up = gate_up.to(torch.promote_types(gate_up.dtype, torch.float32)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
