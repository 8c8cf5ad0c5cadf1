"""The remote-code export for every other lctrain model: ``configuration_lctrain.py`` and ``modeling_lctrain.py``
(lctrain/hf/templates, plain PyTorch) copied into the folder, ``auto_map`` pointing at them.

Tensors keep lctrain's single-device names under ``model.`` (the untied output layer is ``lm_head.weight``), so the
mapping is the identity; the config holds each mixer's resolved sizes.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil

import torch

from lctrain.config import ModelConfig
from lctrain.model.hybrid import ffn_hidden_size

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"
FILES = ("configuration_lctrain.py", "modeling_lctrain.py")


def _sections(model: ModelConfig) -> dict:
    d = model.hidden_size
    g, s, a, m, b = model.gated_deltanet, model.gated_slot_attention, model.attention, model.mamba2, model.block_state
    head_dim = a.head_dim or d // a.num_heads
    return {
        "gated_deltanet": {"num_heads": g.num_heads, "num_value_heads": g.num_value_heads or g.num_heads,
                           "head_k_dim": g.head_k_dim, "head_v_dim": g.head_v_dim, "conv_size": g.conv_size},
        "gated_slot_attention": {"num_heads": s.num_heads, "num_slots": s.num_slots,
                                 "head_k_dim": s.head_k_dim or d // s.num_heads,
                                 "head_v_dim": s.head_v_dim or d // s.num_heads, "gate_normalizer": s.gate_normalizer},
        "attention": {"num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads or a.num_heads, "head_dim": head_dim,
                      "window": a.window, "rope_theta": a.rope_theta,
                      "rotary_dim": int(head_dim * a.rope_fraction) // 2 * 2, "qk_norm": a.qk_norm,
                      "output_gate": a.output_gate},
        "mamba2": {"num_heads": m.num_heads or m.expand * d // m.head_dim, "head_dim": m.head_dim,
                   "state_size": m.state_size, "num_groups": m.num_groups, "conv_size": m.conv_size},
        "block_state": dataclasses.asdict(b),
    }


class Remote:
    name = "LctrainForCausalLM"
    model_type = "lctrain"
    remote = True

    @staticmethod
    def hf_config(model: ModelConfig, common: dict) -> dict:
        return dict(
            architectures=[Remote.name], model_type=Remote.model_type,
            auto_map={"AutoConfig": "configuration_lctrain.LctrainConfig",
                      "AutoModelForCausalLM": "modeling_lctrain.LctrainForCausalLM"},
            pattern=model.pattern, vocab_size=model.vocab_size, hidden_size=model.hidden_size,
            ffn_hidden_size=ffn_hidden_size(model), norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings,
            **_sections(model), **common)

    @staticmethod
    def write_code(folder: pathlib.Path) -> None:
        for name in FILES:
            shutil.copyfile(TEMPLATES / name, folder / name)

    @staticmethod
    def to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        return {("lm_head.weight" if k == "output.weight" else "model." + k): v for k, v in full.items()}

    @staticmethod
    def from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        return {("output.weight" if k == "lm_head.weight" else k.removeprefix("model.")): v for k, v in tensors.items()}
