"""The short causal depthwise convolution with document resets, as a sum over taps: the oracle of the tests and the
torch path (plain CPU tensors, float64 anywhere).

    z[r, t, c] = sum_{j < W} w[c, j] x[r, t - (W-1) + j, c] [doc[r, t - (W-1) + j] == doc[r, t]]
    y = silu(z) = z sigmoid(z)   (or y = z without the activation)

Positions -(W-1) .. -1 of row r are the halo (the previous context-parallel rank's last W - 1 inputs and their
document ids); without one they read zero. The last tap multiplies the current token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_short_conv_reference(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor,
                                halo: torch.Tensor | None = None, halo_doc_ids: torch.Tensor | None = None,
                                activation: bool = True) -> torch.Tensor:
    """x [R, N, C], weight [C, W], doc_ids [R, N], halo [R, W-1, C], halo_doc_ids [R, W-1] -> y [R, N, C].

    Computes in x's dtype (the weight is cast to it); differentiable in x, weight and halo."""
    rows, length, _ = x.shape
    width = weight.shape[1] - 1
    if halo is None:
        halo = x.new_zeros(rows, width, x.shape[2])
        halo_doc_ids = doc_ids.new_full((rows, width), -1)
    x_ext, doc_ext = torch.cat([halo.to(x.dtype), x], 1), torch.cat([halo_doc_ids.to(doc_ids.dtype), doc_ids], 1)
    w = weight.to(x.dtype)
    z = x * w[:, width]
    for j in range(width):
        same_doc = (doc_ext[:, j:j + length] == doc_ids).unsqueeze(-1)
        z = z + torch.where(same_doc, x_ext[:, j:j + length], 0) * w[:, j]
    return F.silu(z) if activation else z
