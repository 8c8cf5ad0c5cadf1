"""The hybrid language model: token embedding, the pattern's residual sublayers, final RMSNorm, output layer.

    h_0 = Embed(tokens);  h_i = h_{i-1} + Sublayer_i(RMSNorm(h_{i-1})) for each pattern symbol;  logits = W_out RMSNorm(h_n)

Sublayers come from the pattern registry (lctrain.model.registry) as megatron-core ModuleSpecs; projections are
megatron-core column/row-parallel linears, so tensor parallelism splits heads and MLP channels. Tokens of a micro-batch
are processed as one packed row with its ``TokenLayout`` (documents, positions, context-parallel group).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch.utils.checkpoint import checkpoint

from lctrain.config import ModelConfig
from lctrain.model.layout import TokenLayout
from lctrain.model.loss import chunked_cross_entropy
from lctrain.model.norm import RMSNorm
from lctrain.model.registry import LAYERS
from lctrain.model.tp import gather_last_dim


def ffn_hidden_size(model: ModelConfig) -> int:
    """SwiGLU's usual width: 8/3 of the hidden size (same parameters as a 4x GELU MLP), rounded up to 64."""
    return model.ffn_hidden_size or -(-(8 * model.hidden_size // 3) // 64) * 64


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Pad the vocabulary to a multiple of 64 x TP so every rank holds equal, aligned rows (padding ids are never
    targets; they are dropped on export)."""
    multiple = 64 * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config(model: ModelConfig, tensor_parallel_size: int = 1, context_parallel_size: int = 1) -> TransformerConfig:
    attention = model.attention
    return TransformerConfig(
        num_layers=len(model.pattern),
        hidden_size=model.hidden_size,
        ffn_hidden_size=ffn_hidden_size(model),
        num_attention_heads=attention.num_heads,
        num_query_groups=attention.num_kv_heads or attention.num_heads,
        kv_channels=attention.head_dim or model.hidden_size // attention.num_heads,
        layernorm_epsilon=model.norm_eps,
        init_method_std=model.init_std,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        tensor_model_parallel_size=tensor_parallel_size,
        context_parallel_size=context_parallel_size,
        # Weights are drawn in full on the CPU and sliced per rank: the model is the same for every parallel layout
        # and needs no CUDA RNG tracker; the training loop moves it to the GPU.
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )


class Sublayer(MegatronModule):
    """x + mixer(RMSNorm(x)) for one pattern symbol."""

    def __init__(self, config: TransformerConfig, model: ModelConfig, symbol: str):
        super().__init__(config)
        kind = LAYERS[symbol]
        section = {kind.config_section: getattr(model, kind.config_section)} if kind.config_section else {}
        self.symbol = symbol
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mixer = build_module(kind.spec(), config=config, **section)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return x + self.mixer(self.norm(x), layout)


class HostOffloadedSublayer(torch.autograd.Function):
    """A sublayer under block checkpointing whose input waits in pinned host memory between forward and backward
    (``train.activation_checkpointing: block_offload``). Block checkpointing keeps one [L, D] input per sublayer on
    the GPU, at the longest lengths most of a step's memory (4 KiB per token and sublayer at D = 2048, bf16); here
    the forward saves nothing on the GPU and copies the input out on a side stream (overlapping the next sublayer);
    the backward recomputes the sublayer from the input copied back and takes its gradients. Copies back run on the
    side stream one sublayer ahead: each backward first starts fetching the previous sublayer's input (``chain``:
    this forward's sublayers in order), so the copy overlaps its own recompute and gradients. The parameters are
    inputs of the function, so their gradients accumulate through autograd as usual (DeepSpeed's hooks see them).
    Off a GPU the input is kept as it is (nothing to offload to)."""

    @staticmethod
    def forward(ctx, x, layer, layout, chain, *params):
        ctx.layer, ctx.layout, ctx.device = layer, layout, x.device
        ctx.chain, ctx.index, ctx.fetched = chain, len(chain), None
        chain.append(ctx)
        if x.device.type == "cuda":
            ctx.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            stream = _copy_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                ctx.host.copy_(x, non_blocking=True)
            x.record_stream(stream)  # its memory is reused only after the copy
            ctx.copied = stream.record_event()
        else:
            ctx.host = x.detach()
        with torch.no_grad():
            return layer(x, layout)

    @staticmethod
    def _fetch(ctx) -> None:
        """Start copying ctx's input back to the device (on the side stream, after its copy out)."""
        if ctx.device.type != "cuda":
            ctx.fetched = (ctx.host, None)
        else:
            stream = _copy_stream(ctx.device)
            stream.wait_event(ctx.copied)
            with torch.cuda.stream(stream):
                x = ctx.host.to(ctx.device, non_blocking=True)
            ctx.fetched = (x, stream.record_event())
        del ctx.host

    @staticmethod
    def backward(ctx, grad):
        if ctx.fetched is None:
            HostOffloadedSublayer._fetch(ctx)
        if ctx.index > 0:
            HostOffloadedSublayer._fetch(ctx.chain[ctx.index - 1])
        ctx.chain[ctx.index] = None  # the chain no longer holds this sublayer
        x, ready = ctx.fetched
        ctx.fetched = None
        if ready is not None:
            current = torch.cuda.current_stream(ctx.device)
            current.wait_event(ready)
            x.record_stream(current)  # allocated on the side stream, used (and freed) here
        x = x.detach().requires_grad_()
        params = _trainable(ctx.layer)
        with torch.enable_grad():
            out = ctx.layer(x, ctx.layout)
        grads = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
        return grads[0], None, None, None, *grads[1:]


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _trainable(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


class HybridModel(MegatronModule):
    def __init__(self, model: ModelConfig, config: TransformerConfig):
        super().__init__(config)
        self.model_config = model
        tp = config.tensor_model_parallel_size
        self.vocab_size = model.vocab_size
        self.padded_vocab_size = padded_vocab_size(model.vocab_size, tp)
        self.embedding = VocabParallelEmbedding(self.padded_vocab_size, config.hidden_size,
                                                init_method=config.init_method, config=config)
        self.layers = torch.nn.ModuleList(Sublayer(config, model, s) for s in model.pattern)
        self.final_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        if not model.tie_embeddings:
            self.output = ColumnParallelLinear(config.hidden_size, self.padded_vocab_size, config=config,
                                               init_method=config.init_method, bias=False, gather_output=False)
        self.activation_checkpointing = "none"  # train.activation_checkpointing: none, block or block_offload

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.model_config.tie_embeddings else self.output.weight

    def hidden_states(self, input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Final normed hidden states [L, D] of the packed tokens input_ids [rows, row_len]."""
        h = self.embedding(input_ids.reshape(1, -1))
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        chain: list = []  # block_offload's sublayers of this forward, in order
        for layer in self.layers:
            if mode == "block":
                h = checkpoint(layer, h, layout, use_reentrant=False)
            elif mode == "block_offload":
                h = HostOffloadedSublayer.apply(h, layer, layout, chain, *_trainable(layer))
            else:
                h = layer(h, layout)
        return self.final_norm(h)[0]

    def forward(self, input_ids: torch.Tensor, layout: TokenLayout, labels: torch.Tensor, loss_chunk_tokens: int = 4096):
        """(sum of next-token losses over labelled tokens, number of labelled tokens) for this rank's tokens."""
        hidden = self.hidden_states(input_ids, layout)
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * self.output_weight.shape[0]
        loss_sum = chunked_cross_entropy(hidden, self.output_weight, labels.reshape(-1), self.vocab_size, vocab_start,
                                         loss_chunk_tokens, parallel_state.get_tensor_model_parallel_group())
        return loss_sum, (labels != -100).sum()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Full-vocabulary logits [L, vocab_size] (for evaluation of short inputs and export checks)."""
        hidden = self.hidden_states(input_ids, layout)
        local = (hidden @ self.output_weight.t()).float()
        return gather_last_dim(local)[:, : self.vocab_size]
