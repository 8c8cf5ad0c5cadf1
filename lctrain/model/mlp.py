"""SwiGLU feed-forward sublayer (pattern symbol ``-``): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.model.layout import TokenLayout


class SwiGLU(MegatronModule):
    def __init__(self, config: TransformerConfig, **_):
        super().__init__(config)
        # One matmul for gate and up. stride=2 splits the master weight [gate; up] so that every tensor-parallel
        # rank holds [gate_r; up_r]: the function does not depend on the tensor-parallel size.
        self.gate_up = ColumnParallelLinear(config.hidden_size, 2 * config.ffn_hidden_size, config=config,
                                            init_method=config.init_method, bias=False, gather_output=False, stride=2)
        self.down = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, config=config,
                                      init_method=config.output_layer_init_method, bias=False,
                                      input_is_parallel=True, skip_bias_add=True)

    @staticmethod
    def forward_flops_per_token(model, seq_len: int) -> float:
        from lctrain.model.hybrid import ffn_hidden_size

        return 2 * 3 * model.hidden_size * ffn_hidden_size(model)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)[0]
