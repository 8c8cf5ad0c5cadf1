"""Short causal depthwise convolution with document resets: y_t = act(sum_j w_j x_{t-(K-1)+j}), where terms whose
token belongs to another document are dropped (Gated DeltaNet's and Mamba2's kernel-4 conv before the mixer).

Under context parallelism the first K - 1 tokens of a rank need the previous rank's last K - 1 inputs: a halo,
exchanged with gradients, and masked like any other token of another document.

The op is lctrain.kernels.short_conv.causal_short_conv: fused Triton kernels where ``use_triton(x)``, the torch
shifted sum on plain CPU tensors.
"""
from __future__ import annotations

import math

import torch

from lctrain.kernels.short_conv import causal_short_conv
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
        rows, n = layout.rows, layout.row_len
        xr = x.view(rows, n, -1)
        halo = halo_doc = None
        if layout.context is not None:
            halo, halo_doc = layout.context.previous_tail(xr, self.kernel_size - 1)
        y = causal_short_conv(xr, self.weight, layout.doc_ids.view(rows, n), halo, halo_doc, self.activation)
        return y.view(x.shape)
