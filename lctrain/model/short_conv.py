"""Short causal depthwise convolution with document resets: y_t = act(sum_j w_j x_{t-(K-1)+j}), where terms whose
token belongs to another document are dropped (Gated DeltaNet's and Mamba2's kernel-4 conv before the mixer).

Under context parallelism the first K - 1 tokens of a rank need the previous rank's last K - 1 inputs: a halo,
exchanged with gradients, and masked like any other token of another document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lctrain.model.layout import TokenLayout
from lctrain.model.tp import sharded_parameter


class ShortConv(torch.nn.Module):
    def __init__(self, channels: int, kernel_size: int, activation: bool = True):
        """``channels`` is the full (all tensor-parallel ranks) channel count; this rank keeps its slice."""
        super().__init__()
        self.kernel_size = kernel_size
        self.activation = activation
        bound = 1 / math.sqrt(kernel_size)  # torch.nn.Conv1d's default for a depthwise kernel
        self.weight = sharded_parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound), dim=0)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        rows, n, width = layout.rows, layout.row_len, self.kernel_size - 1
        xr = x.view(rows, n, -1)
        doc = layout.doc_ids.view(rows, n)
        if layout.context is not None:
            halo, halo_doc = layout.context.previous_tail(xr, width)
        else:
            halo = xr.new_zeros(rows, width, xr.shape[-1])
            halo_doc = doc.new_full((rows, width), -1)
        x_ext, doc_ext = torch.cat([halo, xr], 1), torch.cat([halo_doc, doc], 1)
        y = xr * self.weight[:, width].to(x.dtype)
        for j in range(width):
            same_doc = (doc_ext[:, j:j + n] == doc).unsqueeze(-1)
            y = y + torch.where(same_doc, x_ext[:, j:j + n], 0) * self.weight[:, j].to(x.dtype)
        if self.activation:
            y = F.silu(y)
        return y.view_as(x)
