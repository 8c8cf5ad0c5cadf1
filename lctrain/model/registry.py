"""The layer-pattern alphabet: one symbol per sublayer, each built from a megatron-core ModuleSpec.

Megatron-core's own symbols where it has them (``G`` Gated DeltaNet, ``M`` Mamba2, ``*`` full attention, ``-`` MLP),
and lctrain's: ``S`` Gated Slot Attention, ``B`` Block-State Transformer layer, ``W`` sliding-window attention.
A model is the pattern's sublayers, each wrapped as x + f(RMSNorm(x)); e.g. ``G-W-`` is GDN, MLP, SWA, MLP.
Adding a mixer is one entry here: a module taking (config: TransformerConfig, <its config section>=...) whose
forward maps (x [1, L, D], layout) to [1, L, D] and whose ``forward_flops_per_token(model, seq_len, **params)``
states its cost. The table is plain data, so reading the alphabet (config checks) does not import megatron.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class LayerKind:
    name: str
    module: str  # "package.module:Class"
    config_section: str | None  # the ModelConfig field passed to the module under its own name
    params: tuple = ()  # extra constructor arguments, as (name, value) pairs

    def module_class(self):
        path, cls = self.module.split(":")
        return getattr(importlib.import_module(path), cls)

    def spec(self):
        from megatron.core.transformer.spec_utils import ModuleSpec

        return ModuleSpec(module=self.module_class(), params=dict(self.params))


LAYERS: dict[str, LayerKind] = {
    "G": LayerKind("Gated DeltaNet", "lctrain.model.gated_deltanet:GatedDeltaNet", "gated_deltanet"),
    "S": LayerKind("Gated Slot Attention", "lctrain.model.gated_slot_attention:GatedSlotAttention", "gated_slot_attention"),
    "M": LayerKind("Mamba2", "lctrain.model.mamba2:Mamba2", "mamba2"),
    "B": LayerKind("Block-State Transformer", "lctrain.model.block_state:BlockStateLayer", "block_state"),
    "*": LayerKind("full attention", "lctrain.model.attention:Attention", "attention"),
    "W": LayerKind("sliding-window attention", "lctrain.model.attention:Attention", "attention", (("sliding_window", True),)),
    "-": LayerKind("SwiGLU MLP", "lctrain.model.mlp:SwiGLU", None),
}

LAYER_SYMBOLS = {symbol: kind.name for symbol, kind in LAYERS.items()}
