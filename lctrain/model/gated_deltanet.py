"""Gated DeltaNet sublayer (pattern symbol ``G``), Yang, Kautz & Hatamizadeh, "Gated Delta Networks".

Per value head:  S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(d_k)
(the paper's Eq. 10, the gated delta rule), with Qwen3-Next's parameterisation so checkpoints export natively:
q, k, v from linear projections through a kernel-4 causal depthwise conv and SiLU; q and k L2-normalised;
beta_t = sigmoid(b_t); log alpha_t = g_t = -exp(A_log) * softplus(a_t + dt_bias); output RMSNorm(o) * SiLU(z),
then the output projection. Value heads may outnumber query/key heads (grouped: value head h reads head h // (HV/H)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.config import GatedDeltaNetConfig
from lctrain.kernels.gated_delta import chunk_gated_delta_rule
from lctrain.kernels.gated_delta.checks import MAX_HEAD_DIM
from lctrain.kernels.norm import l2_norm
from lctrain.model.layout import TokenLayout
from lctrain.model.norm import GatedRMSNorm
from lctrain.model.short_conv import ShortConv
from lctrain.model.tp import replicated_parameter, sharded_parameter
from lctrain.parallel.state_passing import EntryPass, run_recurrence


class GatedDeltaRecurrence:
    """The gated delta rule over a rank's tokens, for parallel.state_passing.

    The state is linear in (initial state, values) and its columns evolve independently, so one kernel pass with
    values [v | 0] (width V + K) from initial state [0 | I] (for a carried sequence; [0 | 0] otherwise) yields
    outputs [o_zero | Q] and final states [E | P]: P = prod_t alpha_t (I - beta_t k_t k_t^T) is the boundary map
    S -> P S + E, and o_t = o_zero_t + S_in^T Q_t with Q_t = scale P_t^T q_t (P_t the product up to token t).
    Heads with V + K over the kernel's width limit run the two column blocks as two calls.
    """

    def __init__(self, q, k, v, g, beta):
        self.q, self.k, self.v, self.g, self.beta = q, k, v, g, beta

    def run(self, initial_state, cu_seqlens, output_final_state):
        return chunk_gated_delta_rule(self.q, self.k, self.v, self.g, self.beta, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def entry_pass(self, layout, carried):
        key_dim, value_dim, value_heads = self.k.shape[-1], self.v.shape[-1], self.v.shape[2]
        eye = torch.eye(key_dim, device=self.v.device).expand(carried.numel(), value_heads, key_dim, key_dim)
        identity = torch.where(carried.view(-1, 1, 1, 1), eye, 0.0)
        zero_values = self.v.new_zeros(*self.v.shape[:-1], key_dim)
        if value_dim + key_dim <= MAX_HEAD_DIM:
            values = torch.cat([self.v, zero_values], -1)
            initial = torch.cat([identity.new_zeros(*identity.shape[:-1], value_dim), identity], -1)
            o, final = chunk_gated_delta_rule(self.q, self.k, values, self.g, self.beta, initial_state=initial,
                                              output_final_state=True, cu_seqlens=layout.cu_seqlens)
            o_zero, q_response = o.split([value_dim, key_dim], -1)
            final_zero, transition = final.split([value_dim, key_dim], -1)
        else:
            o_zero, final_zero = self.run(None, layout.cu_seqlens, True)
            q_response, transition = chunk_gated_delta_rule(self.q, self.k, zero_values, self.g, self.beta,
                                                            initial_state=identity, output_final_state=True,
                                                            cu_seqlens=layout.cu_seqlens)
        q_response = q_response.view(layout.rows, layout.row_len, value_heads, key_dim)

        def response(entering):  # o_t += S_in^T Q_t, S_in of the token's row
            delta = torch.einsum("bnhk,bhkv->bnhv", q_response, entering.to(q_response.dtype))
            return delta.reshape(1, -1, value_heads, value_dim)

        return EntryPass(o_zero, final_zero, transition, response)

    @staticmethod
    def apply_transition(transition, state):
        return transition @ state


class GatedDeltaNet(MegatronModule):
    def __init__(self, config: TransformerConfig, gated_deltanet: GatedDeltaNetConfig, **_):
        super().__init__(config)
        c = gated_deltanet
        tp = config.tensor_model_parallel_size
        self.key_dim, self.value_dim = c.head_k_dim, c.head_v_dim
        heads, value_heads = c.num_heads, c.num_value_heads or c.num_heads
        self.heads, self.value_heads = heads // tp, value_heads // tp
        hidden, qk, vz = config.hidden_size, heads * c.head_k_dim, value_heads * c.head_v_dim

        def column(out, parts):
            # stride=parts: each tensor-parallel rank holds its heads of every part, aligned.
            return ColumnParallelLinear(hidden, parts * out, config=config, init_method=config.init_method,
                                        bias=False, gather_output=False, stride=parts)

        self.qk_proj, self.vz_proj, self.ba_proj = column(qk, 2), column(vz, 2), column(value_heads, 2)
        self.q_conv, self.k_conv = ShortConv(qk, c.conv_size), ShortConv(qk, c.conv_size)
        self.v_conv = ShortConv(vz, c.conv_size)
        # Decay rate A in [1, 16] and step dt in [1e-3, 1e-1] log-uniform, as in Mamba2 (dt_bias = softplus^-1(dt)).
        self.A_log = sharded_parameter(torch.empty(value_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(value_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = sharded_parameter(dt + torch.log(-torch.expm1(-dt)))
        self.out_norm = GatedRMSNorm(c.head_v_dim, config.layernorm_epsilon)
        replicated_parameter(self.out_norm.weight)  # one weight for all heads, heads split over ranks
        self.out_proj = RowParallelLinear(vz, hidden, config=config, init_method=config.output_layer_init_method,
                                          bias=False, input_is_parallel=True, skip_bias_add=True)

    @staticmethod
    def forward_flops_per_token(model, seq_len: int, chunk: int = 64) -> float:
        """Projections (2 per weight) plus, per value head, the chunkwise gated delta rule: k^T S, the rank-one state
        update and S^T q (2KV each) and the intra-chunk products over a chunk of C tokens (2C(K + V))."""
        c = model.gated_deltanet
        hv = c.num_value_heads or c.num_heads
        proj = model.hidden_size * (2 * c.num_heads * c.head_k_dim + 2 * hv * c.head_v_dim + 2 * hv) + hv * c.head_v_dim * model.hidden_size
        core = hv * (6 * c.head_k_dim * c.head_v_dim + 2 * chunk * (c.head_k_dim + c.head_v_dim))
        return 2 * proj + core

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        length = x.shape[1]
        q, k = self.qk_proj(x)[0].chunk(2, dim=-1)
        v, z = self.vz_proj(x)[0].chunk(2, dim=-1)
        b, a = self.ba_proj(x)[0].chunk(2, dim=-1)
        q = l2_norm(self.q_conv(q, layout).view(1, length, self.heads, self.key_dim))
        k = l2_norm(self.k_conv(k, layout).view(1, length, self.heads, self.key_dim))
        v = self.v_conv(v, layout).view(1, length, self.value_heads, self.value_dim)
        beta = torch.sigmoid(b.float()).to(x.dtype)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o = run_recurrence(GatedDeltaRecurrence(q, k, v, g, beta), layout)
        o = self.out_norm(o, z.view(1, length, self.value_heads, self.value_dim))
        return self.out_proj(o.reshape(1, length, -1))[0]
