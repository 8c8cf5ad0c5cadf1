"""SwiGLU feed-forward sublayer (pattern symbol ``-``): down(silu(gate(x)) * up(x)).

The activation runs ``lctrain.kernels.swiglu.swiglu`` on the fused projection's [gate; up] output: one fused Triton
pass each way on GPU (no copies of the halves), the float32 torch formula otherwise.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.kernels.swiglu import swiglu
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
        return self.down(swiglu(self.gate_up(x)[0]))[0]
