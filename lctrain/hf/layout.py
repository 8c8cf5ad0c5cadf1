"""How each lctrain parameter is split over tensor-parallel ranks, to join shards into the single-device model and to
cut a single-device model back into shards.

What a shard means is fixed by the layer's forward. A rank's local weight of a fused projection is ``parts`` equal
blocks along ``dim``; the forward splits the local output into those blocks (``.chunk(parts)``) before its heads,
so block i of rank r is rank r's slice of the model's block i:

    single device = [block_0 of ranks 0..tp-1 ; block_1 of ranks 0..tp-1 ; ...]      (Megatron's ``stride``)

Row-parallel output projections split their input dimension the same way. Norm weights shared by all heads, and
the BST's SSM, are replicated: every rank holds them whole.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from lctrain.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Split:
    dim: int
    parts: int = 1


REPLICATED = None
_PROJ = {"out_proj.weight": Split(1)}  # row-parallel output projection of every mixer

Rule = Split | None | Callable[[ModelConfig], Split]  # a callable: the rule depends on the layer's options

RULES: dict[str, dict[str, Rule]] = {
    "G": {"qk_proj.weight": Split(0, 2), "vz_proj.weight": Split(0, 2), "ba_proj.weight": Split(0, 2),
          "q_conv.weight": Split(0), "k_conv.weight": Split(0), "v_conv.weight": Split(0), "A_log": Split(0),
          "dt_bias": Split(0), "out_norm.weight": REPLICATED, **_PROJ},
    "S": {"qk_proj.weight": Split(0, 2), "v_proj.weight": Split(0), "f_proj.weight": Split(0),
          "out_norm_weight": Split(0), **_PROJ},
    "M": {"zx_proj.weight": Split(0, 2), "bc_proj.weight": Split(0, 2), "dt_proj.weight": Split(0),
          "x_conv.weight": Split(0), "b_conv.weight": Split(0), "c_conv.weight": Split(0), "A_log": Split(0),
          "dt_bias": Split(0), "D": Split(0), "norm_weight": Split(0), **_PROJ},
    "B": {"log_dt": REPLICATED, "A_real_log": REPLICATED, "A_imag": REPLICATED, "B": REPLICATED, "C": REPLICATED,
          "skip": REPLICATED, "context_proj": REPLICATED, "qkv_proj.weight": Split(0, 3),
          "context_kv_proj.weight": Split(0, 2), "out_proj.weight": Split(1, 2)},
    "*": {"q_proj.weight": lambda model: Split(0, 2 if model.attention.output_gate else 1),
          "kv_proj.weight": Split(0, 2), "q_norm.weight": REPLICATED, "k_norm.weight": REPLICATED, **_PROJ},
    "-": {"gate_up.weight": Split(0, 2), "down.weight": Split(1)},
}
RULES["W"] = RULES["*"]
TOP_LEVEL: dict[str, Split | None] = {"embedding.weight": Split(0), "output.weight": Split(0), "final_norm.weight": REPLICATED}


def split_rule(name: str, model: ModelConfig) -> Split | None:
    """The rule of parameter ``name`` (a HybridModel state-dict key) of the model ``model`` describes."""
    pattern = model.pattern
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < len(pattern):
        symbol = pattern[int(parts[1])]
        if parts[2] == "norm" and parts[3] == "weight":
            return REPLICATED
        if parts[2] == "mixer" and parts[3] in RULES.get(symbol, {}):
            rule = RULES[symbol][parts[3]]
            return rule(model) if callable(rule) else rule
    raise ValueError(f"no tensor-parallel rule for parameter {name!r} of pattern {pattern!r}; "
                     f"lctrain.hf.layout.RULES must name every parameter of every layer")


def join_shards(shards: list[torch.Tensor], rule: Split | None) -> torch.Tensor:
    """The single-device tensor from the ranks' shards (in rank order)."""
    if rule is None or len(shards) == 1:
        return shards[0]
    blocks = [s.chunk(rule.parts, rule.dim) for s in shards]
    return torch.cat([torch.cat([b[i] for b in blocks], rule.dim) for i in range(rule.parts)], rule.dim)


def cut_shard(full: torch.Tensor, rule: Split | None, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s shard of a single-device tensor: the inverse of join_shards."""
    if rule is None or size == 1:
        return full
    return torch.cat([block.chunk(size, rule.dim)[rank] for block in full.chunk(rule.parts, rule.dim)], rule.dim)
