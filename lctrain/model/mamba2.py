"""Mamba2 sublayer (pattern symbol ``M``), for the GDN-H2 hybrid (Mamba2 + Gated DeltaNet + sliding-window attention).

Per head h with scalar decay (Mamba2's SSD, Dao & Gu 2024, Eq. 1 with A = -exp(A_log) a scalar per head):
    dt_t = softplus(W_dt x_t + dt_bias),   S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T,   y_t = S_t^T C_t + D x_t
with S in R^{N x P}, B_t and C_t shared by the heads of a group, x, B, C through a kernel-4 causal conv and SiLU,
then y * SiLU(z) RMS-normalised per group, and the output projection.

SSD is the scalar-decay special case of gated linear attention: S_t = diag(exp g_t) S_{t-1} + k_t v_t^T,
o_t = S_t^T q_t with q = C, k = dt B, v = x and g = dt A broadcast over the N state channels. lctrain runs it through
GSA's gated linear-attention kernel (``lctrain.kernels.gsa.chunk_gated_linear_attention``) rather than a kernel of
its own: one kernel family serves both mixers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.config import Mamba2Config
from lctrain.model.gated_slot_attention import GatedLinearRecurrence
from lctrain.model.layout import TokenLayout
from lctrain.model.short_conv import ShortConv
from lctrain.model.tp import sharded_parameter
from lctrain.parallel.state_passing import run_recurrence


class Mamba2(MegatronModule):
    def __init__(self, config: TransformerConfig, mamba2: Mamba2Config, **_):
        super().__init__(config)
        c = mamba2
        tp = config.tensor_model_parallel_size
        hidden = config.hidden_size
        inner = c.expand * hidden
        heads = c.num_heads or inner // c.head_dim
        self.head_dim, self.state_size = c.head_dim, c.state_size
        self.heads, self.groups = heads // tp, c.num_groups // tp
        bc = c.num_groups * c.state_size

        def column(out, parts):
            return ColumnParallelLinear(hidden, parts * out, config=config, init_method=config.init_method,
                                        bias=False, gather_output=False, stride=parts)

        self.zx_proj, self.bc_proj, self.dt_proj = column(inner, 2), column(bc, 2), column(heads, 1)
        self.x_conv, self.b_conv, self.c_conv = ShortConv(inner, c.conv_size), ShortConv(bc, c.conv_size), ShortConv(bc, c.conv_size)
        self.A_log = sharded_parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = sharded_parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D = sharded_parameter(torch.ones(heads))
        self.norm_weight = sharded_parameter(torch.ones(inner))
        self.out_proj = RowParallelLinear(inner, hidden, config=config, init_method=config.output_layer_init_method,
                                          bias=False, input_is_parallel=True, skip_bias_add=True)
        self.eps = config.layernorm_epsilon

    @staticmethod
    def forward_flops_per_token(model, seq_len: int, chunk: int = 64) -> float:
        """Projections (2 per weight) plus, per head, the chunkwise scalar-decay recurrence with an N x P state:
        6NP + 2C(N + P)."""
        c = model.mamba2
        inner = c.expand * model.hidden_size
        heads = c.num_heads or inner // c.head_dim
        proj = model.hidden_size * (2 * inner + 2 * c.num_groups * c.state_size + heads) + inner * model.hidden_size
        core = heads * (6 * c.state_size * c.head_dim + 2 * chunk * (c.state_size + c.head_dim))
        return 2 * proj + core

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        length, per_group = x.shape[1], self.heads // self.groups
        z, xs = self.zx_proj(x)[0].chunk(2, dim=-1)
        b, c = self.bc_proj(x)[0].chunk(2, dim=-1)
        xs = self.x_conv(xs, layout).view(1, length, self.heads, self.head_dim)
        b = self.b_conv(b, layout).view(1, length, self.groups, self.state_size).repeat_interleave(per_group, dim=2)
        c = self.c_conv(c, layout).view(1, length, self.groups, self.state_size).repeat_interleave(per_group, dim=2)
        dt = F.softplus(self.dt_proj(x)[0].float() + self.dt_bias.float())  # [1, L, H]
        g = (dt * -self.A_log.float().exp())[..., None].expand(-1, -1, -1, self.state_size)
        y = run_recurrence(GatedLinearRecurrence(c, (b * dt[..., None]).to(x.dtype), xs, g.contiguous(), 1.0, "key"), layout)
        y = y.float() + self.D.float()[:, None] * xs.float()
        # RMSNorm of y * silu(z) over each group's channels (norm after the gate, as Mamba2).
        y = (y.reshape(1, length, -1) * F.silu(z.float())).view(1, length, self.groups, -1)
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(1, length, -1)
        return self.out_proj((y * self.norm_weight.float()).to(x.dtype))[0]
