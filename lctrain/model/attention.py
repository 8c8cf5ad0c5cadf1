"""Softmax attention sublayers: full causal (pattern symbol ``*``) and sliding-window (``W``), both document-masked.

A query at position p of document d sees the keys of document d at positions p - window < p' <= p (window = infinity
for full attention). No T x T mask is ever built: on CUDA, flex_attention runs with a block-sparse mask; elsewhere
SDPA runs over query blocks against only the keys those blocks can see (memory O(block x visible keys)).

Under context parallelism a rank's queries also see keys held by earlier ranks: a sliding window takes the previous
rank's last W - 1 keys and values (a halo); full attention gathers the keys and values of all earlier ranks.

Options that make the full-attention layer Qwen3-Next's (for native Hugging Face export): ``qk_norm`` (RMSNorm of
each head's query and key), ``output_gate`` (o * sigmoid(gate), the gate projected with the query) and
``rope_fraction`` (RoPE on the first fraction of each head's channels).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lctrain.config import AttentionConfig
from lctrain.kernels.rope import rope
from lctrain.model.layout import TokenLayout
from lctrain.model.norm import RMSNorm
from lctrain.model.tp import replicated_parameter


def blockwise_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, window: int | None, scale: float, block: int = 256):
    """Document-masked causal attention by query blocks. q [R, Lq, Hq, D]; k, v [R, Lk, Hkv, D]; the key of query i
    is key i + (Lk - Lq) (keys may start with tokens of earlier ranks). Returns [R, Lq, Hq, D]."""
    rows, lq, hq, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    offset = lk - lq
    out = torch.empty_like(q)
    for r in range(rows):
        for s in range(0, lq, block):
            e = min(s + block, lq)
            # The block's first query cannot see before its document's start (nor before its window).
            lo = max(0, offset + s - int(q_pos[r, s]))
            if window is not None:
                lo = max(lo, offset + s - (window - 1))
            hi = offset + e
            qd, qp = q_doc[r, s:e, None], q_pos[r, s:e, None]
            kd, kp = k_doc[r, None, lo:hi], k_pos[r, None, lo:hi]
            visible = (qd == kd) & (kp <= qp)
            if window is not None:
                visible &= qp - kp < window
            out[r, s:e] = F.scaled_dot_product_attention(
                q[r, s:e].transpose(0, 1), k[r, lo:hi].transpose(0, 1), v[r, lo:hi].transpose(0, 1),
                attn_mask=visible, scale=scale, enable_gqa=hq != hkv).transpose(0, 1)
    return out


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


FLEX_BLOCK = 128  # flex_attention's block: lengths are padded to a multiple of it


def _padded(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """x [rows, n, ...] extended along dim 1 to ``length`` with ``value``."""
    extra = length - x.shape[1]
    return x if extra == 0 else torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), value)], 1)


def _flex_length(n: int) -> int:
    return -(-n // FLEX_BLOCK) * FLEX_BLOCK


def flex_block_mask(q_doc, q_pos, k_doc, k_pos, window: int | None, block: int | None = None):
    """The block-sparse mask over the padded lengths: a query sees the keys of its document at positions up to its
    own (and within ``window`` of it). ``block`` W further confines queries and keys to the same W-token span of the
    row (qi // W == ki // W: the Block-State Transformer's in-block attention), which needs the keys to be the
    queries' own tokens. Padding tokens are of document -2 (no real token's): padded queries see only padded keys,
    so the mask's captured tensors are read only inside their padded extents."""
    from torch.nn.attention.flex_attention import create_block_mask

    if block is not None and q_doc.shape != k_doc.shape:
        raise ValueError(f"flex_block_mask with block={block} needs keys that are the queries' own tokens, "
                         f"got {q_doc.shape[1]} queries and {k_doc.shape[1]} keys per row")
    lq, lk = _flex_length(q_doc.shape[1]), _flex_length(k_doc.shape[1])
    q_doc, k_doc = _padded(q_doc, lq, -2), _padded(k_doc, lk, -2)
    q_pos, k_pos = _padded(q_pos, lq, 0), _padded(k_pos, lk, 0)

    def visible(b, h, qi, ki):
        same = (q_doc[b, qi] == k_doc[b, ki]) & (k_pos[b, ki] <= q_pos[b, qi])
        if window is not None:
            same = same & (q_pos[b, qi] - k_pos[b, ki] < window)
        if block is not None:
            same = same & (qi // block == ki // block)
        return same

    # Compiled on CUDA (eager evaluation materialises lq x lk booleans). The CPU path is for tests at small lengths:
    # eager there, since a second compile in one process (another length) hit a C++ codegen error in inductor's CPU
    # backend (torch 2.13: '?:' on VecMask<int> and VecMask<float>).
    return create_block_mask(visible, q_doc.shape[0], None, lq, lk, device=q_doc.device,
                             _compile=q_doc.device.type == "cuda")


def flex_attention_documents(q, k, v, block_mask, scale: float):
    """q [rows, n, Hq, D], k, v [rows, m, Hkv, D] -> [rows, n, Hq, D], through lengths padded to whole flex blocks.
    Unaligned lengths (a context-parallel halo makes m = n + W - 1) are a reported source of flex faults (pytorch
    #174923, #153799); the padding costs at most 127 tokens. (The illegal access of the first GPU context-parallel
    runs was not flex's: it was the gated delta rule's 16-wide tiles, benchmarks/NOTES.md.)"""
    n, m = q.shape[1], k.shape[1]
    q, k, v = _padded(q, _flex_length(n), 0), _padded(k, _flex_length(m), 0), _padded(v, _flex_length(m), 0)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)[:, :n]


class Attention(MegatronModule):
    """Grouped-query softmax attention with RoPE; ``window`` None is full causal attention, else sliding-window."""

    def __init__(self, config: TransformerConfig, attention: AttentionConfig, sliding_window: bool = False, **_):
        super().__init__(config)
        self.cfg = attention
        self.window = attention.window if sliding_window else None
        tp = config.tensor_model_parallel_size
        self.head_dim = attention.head_dim or config.hidden_size // attention.num_heads
        self.heads = attention.num_heads // tp
        self.kv_heads = (attention.num_kv_heads or attention.num_heads) // tp
        self.rot_dim = int(self.head_dim * attention.rope_fraction) // 2 * 2
        d, h, kv = self.head_dim, attention.num_heads, attention.num_kv_heads or attention.num_heads
        # Query (and its output gate) and key/value in two matmuls; stride keeps each rank's parts aligned.
        q_parts = 2 if attention.output_gate else 1
        self.q_proj = ColumnParallelLinear(config.hidden_size, q_parts * h * d, config=config, init_method=config.init_method,
                                           bias=False, gather_output=False, stride=q_parts)
        self.kv_proj = ColumnParallelLinear(config.hidden_size, 2 * kv * d, config=config, init_method=config.init_method,
                                            bias=False, gather_output=False, stride=2)
        self.out_proj = RowParallelLinear(h * d, config.hidden_size, config=config, init_method=config.output_layer_init_method,
                                          bias=False, input_is_parallel=True, skip_bias_add=True)
        if attention.qk_norm:
            self.q_norm = RMSNorm(d, config.layernorm_epsilon)
            self.k_norm = RMSNorm(d, config.layernorm_epsilon)
            replicated_parameter(self.q_norm.weight)  # one weight for all heads, heads split over ranks
            replicated_parameter(self.k_norm.weight)

    @staticmethod
    def visible_keys(seq_len: int, window: int | None) -> float:
        """Mean number of keys a query sees in a causal sequence of seq_len tokens (window: at most W)."""
        w = seq_len if window is None else min(window, seq_len)
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len

    @classmethod
    def forward_flops_per_token(cls, model, seq_len: int, sliding_window: bool = False) -> float:
        """Projections (2 per weight) plus QK^T and PV over the visible keys (2 x 2 x heads x head_dim each)."""
        a = model.attention
        d = a.head_dim or model.hidden_size // a.num_heads
        kv = a.num_kv_heads or a.num_heads
        proj = model.hidden_size * d * (a.num_heads * (2 if a.output_gate else 1) + 2 * kv + a.num_heads)
        return 2 * proj + 4 * a.num_heads * d * cls.visible_keys(seq_len, a.window if sliding_window else None)

    def backend(self, device: torch.device) -> str:
        if self.cfg.backend != "auto":
            return self.cfg.backend
        return "flex" if device.type == "cuda" else "blockwise"

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        rows, n = layout.rows, layout.row_len
        # Fused projections hold [part_1; part_2] per rank (stride): split the parts first, then the heads.
        q = self.q_proj(x)[0]
        if self.cfg.output_gate:
            q, gate = q.chunk(2, dim=-1)
            gate = gate.view(rows, n, self.heads, self.head_dim)
        q = q.view(rows, n, self.heads, self.head_dim)
        k, v = (t.view(rows, n, self.kv_heads, self.head_dim) for t in self.kv_proj(x)[0].chunk(2, dim=-1))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pos = layout.positions.view(rows, n)
        q_doc = layout.doc_ids.view(rows, n)
        # RoPE (rotate-half) on the first rot_dim channels: one fused kernel each way on GPU (lctrain.kernels.rope)
        q = rope(q, q_pos, self.rot_dim, self.cfg.rope_theta)
        k = rope(k, q_pos, self.rot_dim, self.cfg.rope_theta)
        k_doc, k_pos = q_doc, q_pos
        if layout.context is not None:  # keys held by earlier ranks of the context-parallel group
            k, v, k_doc, k_pos = layout.context.earlier_keys(k, v, q_doc, q_pos, self.window)
        scale = self.head_dim ** -0.5
        if self.backend(x.device) == "flex":
            key = ("flex_mask", self.window, k_doc.shape[1])
            if key not in layout.cache:
                layout.cache[key] = flex_block_mask(q_doc, q_pos, k_doc, k_pos, self.window)
            o = flex_attention_documents(q, k, v, layout.cache[key], scale)
        else:
            o = blockwise_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, self.window, scale)
        if self.cfg.output_gate:
            o = o * torch.sigmoid(gate)
        return self.out_proj(o.reshape(1, rows * n, -1))[0]
