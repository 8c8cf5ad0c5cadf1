"""Model FLOPs per token, the numerator of achieved TFLOP/s and MFU.

    training FLOPs per token = 3 x forward FLOPs per token    (backward = 2 x forward)
    forward FLOPs per token  = 2 x D x V (output layer) + sum over sublayers of the sublayer's forward FLOPs

Each sublayer class states its own forward FLOPs per token (``forward_flops_per_token``): 2 per weight of its
projections (the 6N rule's share) plus its token-mixing arithmetic (attention over the visible keys; the chunkwise
recurrences' state products). Recomputation by activation checkpointing is not counted: these are model FLOPs.
Norms, activations and the embedding lookup are omitted (under 1%).
"""
from __future__ import annotations

from lctrain.config import ModelConfig
from lctrain.model.registry import LAYERS

# Dense bf16 tensor-core peak, TFLOP/s (datasheet, without sparsity), for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def forward_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    total = 2.0 * model.hidden_size * model.vocab_size
    for symbol in model.pattern:
        kind = LAYERS[symbol]
        total += kind.module_class().forward_flops_per_token(model, seq_len, **dict(kind.params))
    return total


def training_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(model, seq_len)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
