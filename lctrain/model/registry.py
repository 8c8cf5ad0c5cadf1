"""The layer-pattern alphabet: one symbol per sublayer, each a megatron-core ModuleSpec.

Megatron-core's own symbols where it has them (``G`` Gated DeltaNet, ``M`` Mamba2, ``*`` full attention, ``-`` MLP),
and lctrain's: ``S`` Gated Slot Attention, ``B`` Block-State Transformer layer, ``W`` sliding-window attention.
A model is the pattern's sublayers, each wrapped as x + f(RMSNorm(x)); e.g. ``G-W-`` is GDN, MLP, SWA, MLP.
Adding a mixer is one entry here: a module taking (config: TransformerConfig, <its config section>=...) whose
forward maps (x [1, L, D], layout) to [1, L, D].
"""
from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec


@dataclasses.dataclass(frozen=True)
class LayerKind:
    name: str
    spec: ModuleSpec  # module given as (import path, class name): kernels load only when a model is built
    config_section: str | None  # the ModelConfig field passed to the module under its own name


LAYERS: dict[str, LayerKind] = {
    "G": LayerKind("Gated DeltaNet", ModuleSpec(module=("lctrain.model.gated_deltanet", "GatedDeltaNet")), "gated_deltanet"),
    "S": LayerKind("Gated Slot Attention", ModuleSpec(module=("lctrain.model.gated_slot_attention", "GatedSlotAttention")), "gated_slot_attention"),
    "M": LayerKind("Mamba2", ModuleSpec(module=("lctrain.model.mamba2", "Mamba2")), "mamba2"),
    "B": LayerKind("Block-State Transformer", ModuleSpec(module=("lctrain.model.block_state", "BlockStateLayer")), "block_state"),
    "*": LayerKind("full attention", ModuleSpec(module=("lctrain.model.attention", "Attention")), "attention"),
    "W": LayerKind("sliding-window attention", ModuleSpec(module=("lctrain.model.attention", "Attention"), params={"sliding_window": True}), "attention"),
    "-": LayerKind("SwiGLU MLP", ModuleSpec(module=("lctrain.model.mlp", "SwiGLU")), None),
}

LAYER_SYMBOLS = {symbol: kind.name for symbol, kind in LAYERS.items()}
