"""Block-State Transformer sublayer (pattern symbol ``B``), Fathi et al., "Block-State Transformers" (2023).

An S4D state-space model, computed over the whole sequence by FFT convolution (lctrain.kernels.ssm_fft), turns the
input x into a context sequence c. The sequence is cut into blocks of W tokens; each block's tokens attend causally
to the block itself (self-attention) and, by cross-attention, to S context states that summarise everything before
the block; the two outputs are concatenated and projected:  y = W_o [SelfAttn(x_blk); CrossAttn(x_blk, ctx_blk)].
Context states of block i come only from positions before block i (no leakage), in one of the paper's variants:

    single_head    the last S context vectors of the previous block:   ctx_i = c[s_i - S : s_i]
    multi_head     one context vector projected into S states:          ctx_i = split_S(W_mh c[s_i - 1])
    multi_filter   S SSM filters over the same input, each one state:   ctx_i = (c^1[s_i - 1], ..., c^S[s_i - 1])

where s_i is the block's first position. There is no sequential recurrence in the layer (the SSM is a convolution),
so it is parallel over the whole sequence; cost O(T W) for attention plus O(T log T) for the convolution.

Documents: the SSM resets at each document (cu_seqlens); attention is masked across documents, and a context state
is seen only by tokens of the document it summarises. As in the paper, there are no positional embeddings: the SSM
carries position. Under context parallelism blocks never straddle ranks; the SSM state enters from the previous rank
and the context vectors a rank's first block needs come from the previous rank as a halo.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.config import BlockStateConfig
from lctrain.kernels.ssm_fft import s4d_ssm, s4d_transition
from lctrain.model.attention import flex_attention_documents, flex_block_mask
from lctrain.model.layout import TokenLayout
from lctrain.parallel.state_passing import EntryPass, run_recurrence


class S4DRecurrence:
    """The S4D SSM over a rank's tokens, for parallel.state_passing: per channel and mode x -> Abar^L x + E.

    The transition is analytic (s4d_transition of each sequence's length). The outputs' response to an entering
    state x_in, Re(C Abar^{t-s+1} x_in) over the carried sequence, is the kernel's own initial-state term, taken by
    running it on zero inputs from x_in (the convolution of zeros is the price of using only the public kernel).
    """

    def __init__(self, u, params):
        self.u, self.params = u, params

    def run(self, initial_state, cu_seqlens, output_final_state):
        return s4d_ssm(self.u, *self.params, initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens)

    def entry_pass(self, layout, carried):
        y, final = self.run(None, layout.cu_seqlens, True)
        lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
        transition = s4d_transition(*self.params[:3], lengths)
        first = layout.row_first_sequence
        ssm = self.params[:5]  # without the skip D: zero inputs add nothing through it

        def response(entering):
            initial = torch.zeros_like(final).index_copy(0, first, entering * carried[first].view(-1, 1, 1, 1))
            return s4d_ssm(torch.zeros_like(self.u), *ssm, initial_state=initial, cu_seqlens=layout.cu_seqlens)[0]

        return EntryPass(y, final, transition, response)

    @staticmethod
    def apply_transition(transition, state):
        return torch.view_as_real(torch.view_as_complex(transition.contiguous()) * torch.view_as_complex(state.contiguous()))


def in_block_attention(q, k, v, layout: TokenLayout, block: int, flex: bool) -> torch.Tensor:
    """Self-attention inside each W-token block of the rows: a query sees the keys of its block and its document at
    positions up to its own. q, k, v [rows, row_len, H, D] -> [rows, row_len, H, D]; row_len a multiple of W.

    flex: flex_attention with a block-sparse mask (block-diagonal: W x W squares, each causal), built once per layout
    and block size and kept in layout.cache; nothing of size W x W per block is materialised, and the kernel skips the
    128 x 128 tiles outside the squares. Otherwise (flex has no CPU backward): SDPA over the blocks with a materialised
    [W, W] mask per block (a boolean mask keeps CUDA's SDPA off its flash kernels, hence flex there).
    """
    rows, n, heads, dim = q.shape
    doc, pos = layout.doc_ids.view(rows, n), layout.positions.view(rows, n)
    scale = dim ** -0.5
    if flex:
        key = ("flex_mask_in_blocks", block)
        if key not in layout.cache:
            layout.cache[key] = flex_block_mask(doc, pos, doc, pos, None, block=block)
        return flex_attention_documents(q, k, v, layout.cache[key], scale)
    fold = lambda t: t.reshape(rows * (n // block), block, *t.shape[2:])  # noqa: E731
    doc, pos = fold(doc), fold(pos)
    visible = (doc[:, None, :, None] == doc[:, None, None, :]) & (pos[:, None, None, :] <= pos[:, None, :, None])
    out = F.scaled_dot_product_attention(fold(q).transpose(1, 2), fold(k).transpose(1, 2), fold(v).transpose(1, 2),
                                         attn_mask=visible, scale=scale)
    return out.transpose(1, 2).reshape(rows, n, heads, dim)


class BlockStateLayer(MegatronModule):
    def __init__(self, config: TransformerConfig, block_state: BlockStateConfig, **_):
        super().__init__(config)
        c = block_state
        tp = config.tensor_model_parallel_size
        hidden = config.hidden_size
        self.variant, self.block, self.num_states = c.variant, c.block_size, c.num_context_states
        self.head_dim, self.heads = hidden // c.num_heads, c.num_heads // tp
        filters = c.num_context_states if c.variant == "multi_filter" else 1
        channels, modes = hidden * filters, c.ssm_state_size
        # S4D-Lin initialisation (Gu et al. 2022): A = -1/2 + i pi n, dt log-uniform in [1e-3, 1e-1], B = 1, C ~ N(0, 1/2).
        # The SSM (and the multi_head projection) run whole on every tensor-parallel rank. Their output feeds only
        # the column-parallel context projection, whose backward sums the input gradient over the ranks, so their
        # gradients are complete on every rank without further reduction.
        self.log_dt = torch.nn.Parameter(torch.empty(channels).uniform_(math.log(1e-3), math.log(1e-1)))
        self.A_real_log = torch.nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.A_imag = torch.nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(channels, 1))
        self.B = torch.nn.Parameter(torch.stack([torch.ones(channels, modes), torch.zeros(channels, modes)], -1))
        self.C = torch.nn.Parameter(torch.randn(channels, modes, 2) * math.sqrt(0.5 / 2))
        self.skip = torch.nn.Parameter(torch.ones(channels))
        if c.variant == "multi_head":
            self.context_proj = torch.nn.Parameter(torch.randn(c.num_context_states * hidden, hidden) * config.init_method_std)

        def column(parts):
            return ColumnParallelLinear(hidden, parts * hidden, config=config, init_method=config.init_method,
                                        bias=False, gather_output=False, stride=parts)

        self.qkv_proj = column(3)  # the block's queries, keys, values
        self.context_kv_proj = column(2)  # keys and values of the context states
        # stride=2: each rank's input is [own_r; cross_r], so the weight's global layout is [own; cross] for any TP.
        self.out_proj = RowParallelLinear(2 * hidden, hidden, config=config, init_method=config.output_layer_init_method,
                                          bias=False, input_is_parallel=True, skip_bias_add=True, stride=2)

    @staticmethod
    def forward_flops_per_token(model, seq_len: int) -> float:
        """Projections (2 per weight): the block's q, k, v (3D^2), the output (2D^2), and per block of W tokens the
        context states' keys and values (2D^2 S; multi_head also its D x SD projection); plus self-attention over
        (W + 1) / 2 keys and cross-attention over S states (4D per key: QK^T and PV). The FFT convolution, O(log T)
        per channel, is not counted."""
        c, d = model.block_state, model.hidden_size
        s, w = c.num_context_states, c.block_size
        per_block = 2 * d * d * s + (s * d * d if c.variant == "multi_head" else 0)
        return 2 * (3 * d * d + 2 * d * d + per_block / w) + 4 * d * ((w + 1) / 2 + s)

    def ssm_parameters(self):
        return (self.log_dt, self.A_real_log, self.A_imag, self.B, self.C, self.skip)

    def context_states(self, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block: context states [rows, n_blocks, S, D] and the document each belongs to [rows, n_blocks, S]."""
        rows, n, d = layout.rows, layout.row_len, x.shape[-1]
        filters = self.num_states if self.variant == "multi_filter" else 1
        u = x.repeat(1, 1, filters) if filters > 1 else x
        c = run_recurrence(S4DRecurrence(u, self.ssm_parameters()), layout).view(rows, n, filters, d)
        doc = layout.doc_ids.view(rows, n)
        tail = self.num_states if self.variant == "single_head" else 1
        if layout.context is not None:
            halo, halo_doc = layout.context.previous_tail(c.reshape(rows, n, -1), tail)
        else:
            halo, halo_doc = c.new_zeros(rows, tail, filters * d), doc.new_full((rows, tail), -1)
        c_ext = torch.cat([halo.view(rows, tail, filters, d), c], 1)  # position p of the rank is c_ext[:, p + tail]
        doc_ext = torch.cat([halo_doc, doc], 1)
        starts = torch.arange(0, n, self.block, device=x.device)  # s_i in local coordinates
        if self.variant == "single_head":
            index = starts[:, None] + torch.arange(self.num_states, device=x.device)  # c[s_i - S + j] = c_ext[s_i + j]
            return c_ext[:, index, 0], doc_ext[:, index]
        last = c_ext[:, starts + tail - 1]  # c[s_i - 1]: [rows, n_blocks, filters, D]
        last_doc = doc_ext[:, starts + tail - 1, None].expand(-1, -1, self.num_states)
        if self.variant == "multi_filter":
            return last, last_doc
        states = (last[:, :, 0] @ self.context_proj.t().to(last.dtype)).view(rows, -1, self.num_states, d)
        return states, last_doc

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        rows, n, w = layout.rows, layout.row_len, self.block
        if n % w:
            raise ValueError(f"block_state.block_size={w} must divide the tokens per row and rank ({n}): "
                             "blocks may not straddle rows or context-parallel ranks")
        blocks, h, hd = n // w, self.heads, self.head_dim
        context, context_doc = self.context_states(x, layout)
        # Fused projections hold [part_1; part_2; ...] per rank (stride): split the parts first, then the heads.
        q, k, v = (t.reshape(rows, n, h, hd) for t in self.qkv_proj(x)[0].chunk(3, dim=-1))
        # Self-attention inside each block: causal, same document. Blocks are W-token spans of the rank's own tokens
        # (row_len % W == 0, and config checks the same per context-parallel rank), so it needs no other rank's keys.
        own = in_block_attention(q, k, v, layout, w, flex=x.device.type == "cuda").reshape(rows, blocks, w, h * hd)
        q = q.view(rows, blocks, w, h, hd)
        doc = layout.doc_ids.view(rows, blocks, w)
        # Cross-attention to the block's S context states, seen only by tokens of the document they summarise.
        ck, cv = (t.reshape(rows, blocks, self.num_states, h, hd)
                  for t in self.context_kv_proj(context.reshape(1, -1, context.shape[-1]))[0].chunk(2, dim=-1))
        scores = torch.einsum("rbwhd,rbshd->rbhws", q.float(), ck.float()) * hd ** -0.5
        allowed = (doc[..., None, :, None] == context_doc[..., None, None, :])  # [rows, blocks, 1, w, S]
        # A finite fill keeps rows with no visible state NaN-free (their weights are then zeroed: output 0).
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.where(allowed, torch.softmax(scores, -1), 0.0)
        cross = torch.einsum("rbhws,rbshd->rbwhd", weights, cv.float()).to(x.dtype).reshape(rows, blocks, w, h * hd)
        out = torch.cat([own, cross], -1).reshape(1, rows * n, -1)
        return self.out_proj(out)[0]
