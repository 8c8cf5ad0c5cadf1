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

from lctrain.config import ModelConfig, TrainConfig
from lctrain.model.layout import TokenLayout
from lctrain.model.loss import chunked_cross_entropy
from lctrain.model.norm import RMSNorm
from lctrain.model.offload import HostOffloadedSublayer, trainable_parameters
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
        self.activation_checkpointing_skip = ""  # train.activation_checkpointing_skip: symbols never checkpointed

    def set_checkpointing(self, train: TrainConfig) -> None:
        self.activation_checkpointing = train.activation_checkpointing
        self.activation_checkpointing_skip = train.activation_checkpointing_skip

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.model_config.tie_embeddings else self.output.weight

    def hidden_states(self, input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Final normed hidden states [L, D] of the packed tokens input_ids [rows, row_len]."""
        h = self.embedding(input_ids.reshape(1, -1))
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        chain: list = []  # block_offload's sublayers of this forward, in order
        for layer in self.layers:
            if layer.symbol in self.activation_checkpointing_skip:
                h = layer(h, layout)
            elif mode == "block":
                h = checkpoint(layer, h, layout, use_reentrant=False)
            elif mode == "block_offload":
                h = HostOffloadedSublayer.apply(h, layer, layout, chain, *trainable_parameters(layer))
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
