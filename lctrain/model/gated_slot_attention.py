"""Gated Slot Attention sublayer (pattern symbol ``S``): gated ABC with a bounded set of M memory slots.

Per head (the GSA paper's recurrence, with q_t, k_t, v_t the Swish feature maps of linear projections):
    f_t = logsigmoid(W_f x_t) / tau        the forget gate in log space, damped by tau (gate_normalizer, 8)
    s_t = 1 - exp(f_t)                     what each slot writes
    Hk_t = Hk_{t-1} diag(exp f_t) + k_t s_t^T,     Hv_t = diag(exp f_t) Hv_{t-1} + s_t v_t^T
    o_t = Hv_t^T softmax(Hk_t^T q_t)       slots read through a softmax (no 1/sqrt(d) scale, as in the paper's code)
then RMSNorm(SiLU(o)) per head and the output projection. Documents reset both slot memories (cu_seqlens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.config import GatedSlotAttentionConfig
from lctrain.kernels.gsa import chunk_gated_linear_attention, chunk_gsa
from lctrain.model.layout import TokenLayout
from lctrain.model.tp import sharded_parameter
from lctrain.parallel.state_passing import EntryPass, run_recurrence


class GatedLinearRecurrence:
    """Gated linear attention over a rank's tokens (GSA's two passes, Mamba2's SSD), for parallel.state_passing.

    The decay is diagonal, so from an entering state S_in a carried sequence's state is S_t = D_t S_in + E_t with
    D_t = diag(exp G_t), G_t the gates' sum from the sequence's start (on the value side: S_in D_t). Hence
    M = D_end, and the outputs gain scale (q_t * exp G_t)^T S_in (value side: exp G_t * scale q_t^T S_in): one
    cumulative sum and one small matmul besides the kernel's pass from zero.
    """

    def __init__(self, q, k, v, g, scale: float, gate_on: str):
        self.q, self.k, self.v, self.g, self.scale, self.gate_on = q, k, v, g, scale, gate_on

    def run(self, initial_state, cu_seqlens, output_final_state):
        return chunk_gated_linear_attention(self.q, self.k, self.v, self.g, scale=self.scale,
                                            initial_state=initial_state, output_final_state=output_final_state,
                                            cu_seqlens=cu_seqlens, gate_on=self.gate_on)

    def entry_pass(self, layout, carried):
        o, final = self.run(None, layout.cu_seqlens, True)
        rows, n, heads = layout.rows, layout.row_len, self.q.shape[2]
        tokens = torch.arange(rows * n, device=carried.device)
        in_carried = carried[torch.searchsorted(layout.cu_seqlens, tokens, right=True) - 1].view(rows, n, 1, 1)
        # A carried sequence starts its row: the row's cumulative gates are the sequence's.
        decay = torch.where(in_carried, self.g.float().view(rows, n, heads, -1).cumsum(1).exp(), 0.0)
        transition = decay.view(rows * n, heads, -1)[layout.cu_seqlens[1:] - 1]  # at each sequence's last token
        q = self.scale * self.q.float().view(rows, n, heads, -1)

        def response(entering):
            if self.gate_on == "key":
                delta = torch.einsum("bnhk,bhkv->bnhv", q * decay, entering)
            else:
                delta = decay * torch.einsum("bnhk,bhkv->bnhv", q, entering)
            return delta.reshape(o.shape).to(o.dtype)

        return EntryPass(o, final, transition, response)

    def apply_transition(self, transition, state):
        return state * (transition[..., :, None] if self.gate_on == "key" else transition[..., None, :])


class GatedSlotRecurrence:
    """GSA over a rank's tokens: one fused kernel without context parallelism; with it, the key pass (value-side
    gates, output: slot scores), the softmax, and the value pass (key-side gates) as two scanned stages."""

    def __init__(self, q, k, v, s, g):
        self.q, self.k, self.v, self.s, self.g = q, k, v, s, g

    def run(self, initial_state, cu_seqlens, output_final_state):
        return chunk_gsa(self.q, self.k, self.v, self.s, self.g, scale=1.0, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def stages(self, scan):
        scores = scan(GatedLinearRecurrence(self.q, self.k, self.s, self.g, 1.0, "value"))
        p = torch.softmax(scores.float(), dim=-1).to(self.q.dtype)
        return scan(GatedLinearRecurrence(p, self.s, self.v, self.g, 1.0, "key"))


class GatedSlotAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, gated_slot_attention: GatedSlotAttentionConfig, **_):
        super().__init__(config)
        c = gated_slot_attention
        tp = config.tensor_model_parallel_size
        hidden = config.hidden_size
        self.key_dim = c.head_k_dim or hidden // c.num_heads
        self.value_dim = c.head_v_dim or hidden // c.num_heads
        self.slots, self.heads = c.num_slots, c.num_heads // tp
        self.gate_normalizer = c.gate_normalizer
        qk, v, f = c.num_heads * self.key_dim, c.num_heads * self.value_dim, c.num_heads * c.num_slots

        def column(out, parts):
            return ColumnParallelLinear(hidden, parts * out, config=config, init_method=config.init_method,
                                        bias=False, gather_output=False, stride=parts)

        self.qk_proj, self.v_proj, self.f_proj = column(qk, 2), column(v, 1), column(f, 1)
        # Per-head RMSNorm statistics (so tensor-parallel ranks need no exchange), per-channel weights.
        self.out_norm_weight = sharded_parameter(torch.ones(v))
        self.out_proj = RowParallelLinear(v, hidden, config=config, init_method=config.output_layer_init_method,
                                          bias=False, input_is_parallel=True, skip_bias_add=True)
        self.eps = config.layernorm_epsilon

    @staticmethod
    def forward_flops_per_token(model, seq_len: int, chunk: int = 64) -> float:
        """Projections (2 per weight) plus, per head, two chunkwise gated linear-attention passes with states K x M
        and M x V: 6 x state size + 2C x (the two widths) each."""
        c = model.gated_slot_attention
        kd = c.head_k_dim or model.hidden_size // c.num_heads
        vd = c.head_v_dim or model.hidden_size // c.num_heads
        m = c.num_slots
        proj = model.hidden_size * c.num_heads * (2 * kd + vd + m) + c.num_heads * vd * model.hidden_size
        core = c.num_heads * (6 * kd * m + 2 * chunk * (kd + m) + 6 * m * vd + 2 * chunk * (m + vd))
        return 2 * proj + core

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        length = x.shape[1]
        q, k = F.silu(self.qk_proj(x)[0]).chunk(2, dim=-1)
        v = F.silu(self.v_proj(x)[0])
        f = F.logsigmoid(self.f_proj(x)[0].float()) / self.gate_normalizer
        s = (1 - f.exp()).to(x.dtype)
        heads = lambda t, d: t.reshape(1, length, self.heads, d)  # noqa: E731
        o = run_recurrence(GatedSlotRecurrence(heads(q, self.key_dim), heads(k, self.key_dim), heads(v, self.value_dim),
                                               heads(s, self.slots), heads(f, self.slots)), layout)
        o = F.silu(o.float())
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        o = o.reshape(1, length, -1) * self.out_norm_weight.float()
        return self.out_proj(o.to(x.dtype))[0]
