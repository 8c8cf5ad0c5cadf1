"""Native Hugging Face architectures an lctrain model maps onto exactly, tensor by tensor, both ways.

Qwen3-Next (``Qwen3NextForCausalLM``): decoder layers of (token mixer, dense MLP), mixers Gated DeltaNet
("linear_attention") or gated full attention ("full_attention"). lctrain pattern: mixer and ``-`` alternating, mixers
``G`` or ``*``; ``*`` with qk_norm and output_gate, rope_fraction giving an even number of rotated channels (Qwen3-
Next's partial_rotary_factor). Qwen3-Next's RMSNorms (layer norms, final norm, q/k norms) scale by (1 + w): the
weights are stored minus one; its gated output norm of Gated DeltaNet scales by w as lctrain's does. Its GDN
projections are grouped by key head: in_proj_qkvz = per key head [q_h, k_h, v of its value heads, z of its value
heads], in_proj_ba = per key head [b of its value heads, a of its value heads]; one conv1d over [q; k; v] channels;
attention's q_proj holds per head [q_h; gate_h] (as lctrain's), k and v projections separate.

Mamba2 (``Mamba2ForCausalLM``): every layer a Mamba2 mixer (pattern of ``M`` only). in_proj = [z; x; B; C; dt],
one conv1d over [x; B; C] without bias, the gated RMSNorm per group after the gate (as lctrain's).

Bamba (``BambaForCausalLM``), the Mamba2 + attention hybrid: decoder layers of (token mixer, dense MLP), mixers Mamba2
(its mixer laid out as Mamba2's) or plain grouped-query attention with partial RoPE (no qk norm, no output gate).
lctrain pattern: ``M`` or ``*`` mixers alternating with ``-``, at least one ``*`` (transformers' cache for Bamba
cannot decode without an attention layer), attention without qk_norm and output_gate.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from lctrain.config import ModelConfig
from lctrain.hf.consolidate import ConversionError
from lctrain.model.hybrid import ffn_hidden_size


def _rotated_channels(model: ModelConfig) -> tuple[int, int]:
    a = model.attention
    head_dim = a.head_dim or model.hidden_size // a.num_heads
    return head_dim, int(head_dim * a.rope_fraction)


def _decoder_config(architecture, model: ModelConfig) -> dict:
    """The fields transformers' hybrid decoders (Qwen3-Next, Bamba) share: sizes, attention heads, partial RoPE,
    SiLU MLP without bias, one decoder layer per mixer + MLP pair."""
    a = model.attention
    head_dim, rotated = _rotated_channels(model)
    return dict(
        architectures=[architecture.name], model_type=architecture.model_type, vocab_size=model.vocab_size,
        hidden_size=model.hidden_size, intermediate_size=ffn_hidden_size(model), num_hidden_layers=len(model.pattern) // 2,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads or a.num_heads, head_dim=head_dim,
        hidden_act="silu", rms_norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": rotated / head_dim},
        attention_bias=False)


def qwen3_next_misfit(model: ModelConfig) -> str | None:
    """Why the model is not a Qwen3-Next model (None: it is)."""
    p = model.pattern
    if len(p) % 2 or set(p[0::2]) - {"G", "*"} or set(p[1::2]) != {"-"}:
        return "its pattern does not alternate a G or * mixer with -"
    if "*" in p:
        a = model.attention
        head_dim, rotated = _rotated_channels(model)
        if not (a.qk_norm and a.output_gate):
            return "its full attention lacks Qwen3-Next's qk_norm and output_gate"
        if rotated % 2:
            return f"rope_fraction x head_dim = {head_dim * a.rope_fraction} rotated channels is not even"
    return None


def mamba2_misfit(model: ModelConfig) -> str | None:
    return None if set(model.pattern) == {"M"} else "its pattern is not Mamba2 layers only"


def bamba_misfit(model: ModelConfig) -> str | None:
    p = model.pattern
    if len(p) % 2 or set(p[0::2]) - {"M", "*"} or set(p[1::2]) != {"-"}:
        return "its pattern does not alternate an M or * mixer with -"
    if "*" not in p:
        return "it has no * layer (transformers' Bamba cache cannot decode without one)"
    a = model.attention
    head_dim, rotated = _rotated_channels(model)
    if a.qk_norm or a.output_gate:
        return "its full attention has qk_norm or output_gate, which Bamba's has not"
    if rotated % 2:
        return f"rope_fraction x head_dim = {head_dim * a.rope_fraction} rotated channels is not even"
    return None


def _split(t: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    return list(t.split(list(sizes), dim=0))


class Qwen3Next:
    name = "Qwen3NextForCausalLM"
    model_type = "qwen3_next"
    remote = False

    @staticmethod
    def hf_config(model: ModelConfig, common: dict) -> dict:
        g = model.gated_deltanet
        mixers = model.pattern[0::2]
        return dict(
            _decoder_config(Qwen3Next, model), linear_conv_kernel_dim=g.conv_size, linear_key_head_dim=g.head_k_dim,
            linear_value_head_dim=g.head_v_dim, linear_num_key_heads=g.num_heads,
            linear_num_value_heads=g.num_value_heads or g.num_heads,
            layer_types=["linear_attention" if s == "G" else "full_attention" for s in mixers],
            mlp_only_layers=list(range(len(mixers))), **common)

    @staticmethod
    def model_config(hf: dict) -> ModelConfig:
        layers = hf["num_hidden_layers"]
        if set(range(layers)) - set(hf.get("mlp_only_layers") or []) and hf.get("num_experts", 0) > 0:
            raise ConversionError("this Qwen3-Next model has mixture-of-experts layers; lctrain imports dense ones "
                                  "(mlp_only_layers covering every layer)")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(f"this Qwen3-Next model uses {rope['rope_type']!r} RoPE scaling; lctrain has plain RoPE")
        mixers = "".join("G" if t == "linear_attention" else "*" for t in hf["layer_types"])
        model = ModelConfig(pattern="".join(m + "-" for m in mixers), hidden_size=hf["hidden_size"],
                            ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                            tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf["rms_norm_eps"])
        model.gated_deltanet = dataclasses.replace(
            model.gated_deltanet, num_heads=hf["linear_num_key_heads"], num_value_heads=hf["linear_num_value_heads"],
            head_k_dim=hf["linear_key_head_dim"], head_v_dim=hf["linear_value_head_dim"],
            conv_size=hf["linear_conv_kernel_dim"])
        model.attention = dataclasses.replace(
            model.attention, num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
            head_dim=hf["head_dim"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_fraction=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))),
            qk_norm=True, output_gate=True)
        return model

    @staticmethod
    def to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        heads = model.gated_deltanet.num_heads
        out = {"model.embed_tokens.weight": full["embedding.weight"], "model.norm.weight": full["final_norm.weight"] - 1}
        if "output.weight" in full:
            out["lm_head.weight"] = full["output.weight"]
        for i, symbol in enumerate(model.pattern[0::2]):
            mixer, mlp, hf = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out[hf + "input_layernorm.weight"] = full[mixer + "norm.weight"] - 1
            out[hf + "post_attention_layernorm.weight"] = full[mlp + "norm.weight"] - 1
            out.update(_mlp_to_hf(full, mlp + "mixer.", hf + "mlp."))
            m = mixer + "mixer."
            if symbol == "G":
                q, k = full[m + "qk_proj.weight"].chunk(2)
                v, z = full[m + "vz_proj.weight"].chunk(2)
                b, a = full[m + "ba_proj.weight"].chunk(2)
                by_key_head = lambda *ts: torch.cat([t.reshape(heads, -1, t.shape[-1]) for t in ts], 1).flatten(0, 1)  # noqa: E731
                out.update({
                    hf + "linear_attn.in_proj_qkvz.weight": by_key_head(q, k, v, z),
                    hf + "linear_attn.in_proj_ba.weight": by_key_head(b, a),
                    hf + "linear_attn.conv1d.weight": torch.cat([full[m + n] for n in ("q_conv.weight", "k_conv.weight",
                                                                                       "v_conv.weight")])[:, None],
                    hf + "linear_attn.A_log": full[m + "A_log"], hf + "linear_attn.dt_bias": full[m + "dt_bias"],
                    hf + "linear_attn.norm.weight": full[m + "out_norm.weight"],
                    hf + "linear_attn.out_proj.weight": full[m + "out_proj.weight"]})
            else:
                out.update(_attention_to_hf(full, m, hf + "self_attn.", model))
                out[hf + "self_attn.q_norm.weight"] = full[m + "q_norm.weight"] - 1
                out[hf + "self_attn.k_norm.weight"] = full[m + "k_norm.weight"] - 1
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        g = model.gated_deltanet
        heads, value_heads = g.num_heads, g.num_value_heads or g.num_heads
        group = value_heads // heads  # value heads per key head
        full = {"embedding.weight": tensors["model.embed_tokens.weight"], "final_norm.weight": tensors["model.norm.weight"] + 1}
        if not model.tie_embeddings:
            full["output.weight"] = tensors["lm_head.weight"]
        for i, symbol in enumerate(model.pattern[0::2]):
            mixer, mlp, hf = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            full[mixer + "norm.weight"] = tensors[hf + "input_layernorm.weight"] + 1
            full[mlp + "norm.weight"] = tensors[hf + "post_attention_layernorm.weight"] + 1
            full.update(_mlp_from_hf(tensors, hf + "mlp.", mlp + "mixer."))
            m = mixer + "mixer."
            if symbol == "G":
                qkvz = tensors[hf + "linear_attn.in_proj_qkvz.weight"]
                q, k, v, z = qkvz.view(heads, -1, qkvz.shape[-1]).split(
                    [g.head_k_dim, g.head_k_dim, group * g.head_v_dim, group * g.head_v_dim], dim=1)
                ba = tensors[hf + "linear_attn.in_proj_ba.weight"]
                b, a = ba.view(heads, -1, ba.shape[-1]).split([group, group], dim=1)
                flat = lambda *ts: torch.cat([t.flatten(0, 1) for t in ts])  # noqa: E731
                q_conv, k_conv, v_conv = _split(tensors[hf + "linear_attn.conv1d.weight"][:, 0], heads * g.head_k_dim,
                                                heads * g.head_k_dim, value_heads * g.head_v_dim)
                full.update({
                    m + "qk_proj.weight": flat(q, k), m + "vz_proj.weight": flat(v, z), m + "ba_proj.weight": flat(b, a),
                    m + "q_conv.weight": q_conv, m + "k_conv.weight": k_conv, m + "v_conv.weight": v_conv,
                    m + "A_log": tensors[hf + "linear_attn.A_log"], m + "dt_bias": tensors[hf + "linear_attn.dt_bias"],
                    m + "out_norm.weight": tensors[hf + "linear_attn.norm.weight"],
                    m + "out_proj.weight": tensors[hf + "linear_attn.out_proj.weight"]})
            else:
                full.update(_attention_from_hf(tensors, hf + "self_attn.", m, model))
                full[m + "q_norm.weight"] = tensors[hf + "self_attn.q_norm.weight"] + 1
                full[m + "k_norm.weight"] = tensors[hf + "self_attn.k_norm.weight"] + 1
        return {k: v.contiguous() for k, v in full.items()}


def _mamba_to_hf(full: dict, m: str, hf: str) -> dict:
    """lctrain's Mamba2 mixer (prefix m) as transformers' Mamba2 / Bamba mixer (prefix hf)."""
    return {hf + "in_proj.weight": torch.cat([full[m + "zx_proj.weight"], full[m + "bc_proj.weight"], full[m + "dt_proj.weight"]]),
            hf + "conv1d.weight": torch.cat([full[m + n] for n in ("x_conv.weight", "b_conv.weight", "c_conv.weight")])[:, None],
            hf + "A_log": full[m + "A_log"], hf + "dt_bias": full[m + "dt_bias"], hf + "D": full[m + "D"],
            hf + "norm.weight": full[m + "norm_weight"], hf + "out_proj.weight": full[m + "out_proj.weight"]}


def _mamba_from_hf(tensors: dict, hf: str, m: str, model: ModelConfig) -> dict:
    c = model.mamba2
    inner = c.expand * model.hidden_size
    bc, heads = c.num_groups * c.state_size, c.num_heads or inner // c.head_dim
    zx, bcw, dt = _split(tensors[hf + "in_proj.weight"], 2 * inner, 2 * bc, heads)
    x_conv, b_conv, c_conv = _split(tensors[hf + "conv1d.weight"][:, 0], inner, bc, bc)
    return {m + "zx_proj.weight": zx, m + "bc_proj.weight": bcw, m + "dt_proj.weight": dt, m + "x_conv.weight": x_conv,
            m + "b_conv.weight": b_conv, m + "c_conv.weight": c_conv, m + "A_log": tensors[hf + "A_log"],
            m + "dt_bias": tensors[hf + "dt_bias"], m + "D": tensors[hf + "D"], m + "norm_weight": tensors[hf + "norm.weight"],
            m + "out_proj.weight": tensors[hf + "out_proj.weight"]}


def _attention_to_hf(full: dict, m: str, hf: str, model: ModelConfig) -> dict:
    """lctrain's attention projections: q_proj = [q; output gate] over all heads, kv_proj = [k; v]. transformers'
    gated q_proj (Qwen3-Next) holds per head [q_h; gate_h]."""
    a = model.attention
    head_dim, _ = _rotated_channels(model)
    q = full[m + "q_proj.weight"]
    if a.output_gate:
        q = torch.cat([t.reshape(a.num_heads, head_dim, -1) for t in q.chunk(2)], 1).flatten(0, 1)
    k, v = full[m + "kv_proj.weight"].chunk(2)
    return {hf + "q_proj.weight": q, hf + "k_proj.weight": k, hf + "v_proj.weight": v,
            hf + "o_proj.weight": full[m + "out_proj.weight"]}


def _attention_from_hf(tensors: dict, hf: str, m: str, model: ModelConfig) -> dict:
    a = model.attention
    head_dim, _ = _rotated_channels(model)
    q = tensors[hf + "q_proj.weight"]
    if a.output_gate:
        q = torch.cat([t.flatten(0, 1) for t in q.view(a.num_heads, 2 * head_dim, -1).chunk(2, dim=1)])
    return {m + "q_proj.weight": q, m + "kv_proj.weight": torch.cat([tensors[hf + "k_proj.weight"], tensors[hf + "v_proj.weight"]]),
            m + "out_proj.weight": tensors[hf + "o_proj.weight"]}


def _mlp_to_hf(full: dict, m: str, hf: str) -> dict:
    gate, up = full[m + "gate_up.weight"].chunk(2)
    return {hf + "gate_proj.weight": gate, hf + "up_proj.weight": up, hf + "down_proj.weight": full[m + "down.weight"]}


def _mlp_from_hf(tensors: dict, hf: str, m: str) -> dict:
    return {m + "gate_up.weight": torch.cat([tensors[hf + "gate_proj.weight"], tensors[hf + "up_proj.weight"]]),
            m + "down.weight": tensors[hf + "down_proj.weight"]}


class Mamba2:
    name = "Mamba2ForCausalLM"
    model_type = "mamba2"
    remote = False

    @staticmethod
    def hf_config(model: ModelConfig, common: dict) -> dict:
        c = model.mamba2
        inner = c.expand * model.hidden_size
        return dict(
            architectures=[Mamba2.name], model_type=Mamba2.model_type, vocab_size=model.vocab_size,
            hidden_size=model.hidden_size, num_hidden_layers=len(model.pattern), num_heads=c.num_heads or inner // c.head_dim,
            head_dim=c.head_dim, state_size=c.state_size, n_groups=c.num_groups, expand=c.expand, conv_kernel=c.conv_size,
            layer_norm_epsilon=model.norm_eps, use_bias=False, use_conv_bias=False, hidden_act="silu",
            residual_in_fp32=True, time_step_limit=[0.0, math.inf], chunk_size=model.chunk_size,
            tie_word_embeddings=model.tie_embeddings, **common)

    @staticmethod
    def model_config(hf: dict) -> ModelConfig:
        if hf.get("use_bias") or hf.get("use_conv_bias", True):
            raise ConversionError("this Mamba2 model has projection or convolution biases; lctrain's Mamba2 has none")
        limit = hf.get("time_step_limit") or [0.0, math.inf]
        if limit[0] > 0 or limit[1] < math.inf:
            raise ConversionError(f"this Mamba2 model clamps dt to {limit}; lctrain's Mamba2 does not")
        model = ModelConfig(pattern="M" * hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                            vocab_size=hf["vocab_size"], tie_embeddings=hf.get("tie_word_embeddings", False),
                            norm_eps=hf["layer_norm_epsilon"])
        model.mamba2 = dataclasses.replace(model.mamba2, num_heads=hf["num_heads"], head_dim=hf["head_dim"],
                                           state_size=hf["state_size"], num_groups=hf["n_groups"], expand=hf["expand"],
                                           conv_size=hf["conv_kernel"])
        return model

    @staticmethod
    def to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        out = {"backbone.embeddings.weight": full["embedding.weight"], "backbone.norm_f.weight": full["final_norm.weight"]}
        if "output.weight" in full:
            out["lm_head.weight"] = full["output.weight"]
        for i in range(len(model.pattern)):
            out[f"backbone.layers.{i}.norm.weight"] = full[f"layers.{i}.norm.weight"]
            out.update(_mamba_to_hf(full, f"layers.{i}.mixer.", f"backbone.layers.{i}.mixer."))
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        full = {"embedding.weight": tensors["backbone.embeddings.weight"], "final_norm.weight": tensors["backbone.norm_f.weight"]}
        if not model.tie_embeddings:
            full["output.weight"] = tensors["lm_head.weight"]
        for i in range(len(model.pattern)):
            full[f"layers.{i}.norm.weight"] = tensors[f"backbone.layers.{i}.norm.weight"]
            full.update(_mamba_from_hf(tensors, f"backbone.layers.{i}.mixer.", f"layers.{i}.mixer.", model))
        return {k: v.contiguous() for k, v in full.items()}


class Bamba:
    name = "BambaForCausalLM"
    model_type = "bamba"
    remote = False

    @staticmethod
    def hf_config(model: ModelConfig, common: dict) -> dict:
        c = model.mamba2
        inner = c.expand * model.hidden_size
        mixers = model.pattern[0::2]
        return dict(
            _decoder_config(Bamba, model), mlp_bias=False,
            attn_layer_indices=[i for i, s in enumerate(mixers) if s == "*"],
            mamba_n_heads=c.num_heads or inner // c.head_dim, mamba_d_head=c.head_dim, mamba_n_groups=c.num_groups,
            mamba_d_state=c.state_size, mamba_d_conv=c.conv_size, mamba_expand=c.expand,
            mamba_chunk_size=model.chunk_size, mamba_conv_bias=False, mamba_proj_bias=False,
            time_step_limit=[0.0, math.inf], **common)

    @staticmethod
    def model_config(hf: dict) -> ModelConfig:
        if hf.get("mamba_conv_bias", True) or hf.get("mamba_proj_bias") or hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConversionError("this Bamba model has biases; lctrain's layers have none")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(f"this Bamba model uses {rope['rope_type']!r} RoPE scaling; lctrain has plain RoPE")
        attention = set(hf.get("attn_layer_indices") or [])
        mixers = "".join("*" if i in attention else "M" for i in range(hf["num_hidden_layers"]))
        model = ModelConfig(pattern="".join(m + "-" for m in mixers), hidden_size=hf["hidden_size"],
                            ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                            tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf["rms_norm_eps"])
        model.mamba2 = dataclasses.replace(model.mamba2, num_heads=hf["mamba_n_heads"], head_dim=hf["mamba_d_head"],
                                           state_size=hf["mamba_d_state"], num_groups=hf["mamba_n_groups"],
                                           expand=hf["mamba_expand"], conv_size=hf["mamba_d_conv"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        model.attention = dataclasses.replace(
            model.attention, num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
            head_dim=head_dim, rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_fraction=float(rope.get("partial_rotary_factor", 0.5)))
        return model

    @staticmethod
    def to_hf(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        out = {"model.embed_tokens.weight": full["embedding.weight"], "model.final_layernorm.weight": full["final_norm.weight"]}
        if "output.weight" in full:
            out["lm_head.weight"] = full["output.weight"]
        for i, symbol in enumerate(model.pattern[0::2]):
            mixer, mlp, hf = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out[hf + "input_layernorm.weight"] = full[mixer + "norm.weight"]
            out[hf + "pre_ff_layernorm.weight"] = full[mlp + "norm.weight"]
            out.update(_mlp_to_hf(full, mlp + "mixer.", hf + "feed_forward."))
            if symbol == "M":
                out.update(_mamba_to_hf(full, mixer + "mixer.", hf + "mamba."))
            else:
                out.update(_attention_to_hf(full, mixer + "mixer.", hf + "self_attn.", model))
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
        full = {"embedding.weight": tensors["model.embed_tokens.weight"], "final_norm.weight": tensors["model.final_layernorm.weight"]}
        if not model.tie_embeddings:
            full["output.weight"] = tensors["lm_head.weight"]
        for i, symbol in enumerate(model.pattern[0::2]):
            mixer, mlp, hf = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            full[mixer + "norm.weight"] = tensors[hf + "input_layernorm.weight"]
            full[mlp + "norm.weight"] = tensors[hf + "pre_ff_layernorm.weight"]
            full.update(_mlp_from_hf(tensors, hf + "feed_forward.", mlp + "mixer."))
            if symbol == "M":
                full.update(_mamba_from_hf(tensors, hf + "mamba.", mixer + "mixer.", model))
            else:
                full.update(_attention_from_hf(tensors, hf + "self_attn.", mixer + "mixer.", model))
        return {k: v.contiguous() for k, v in full.items()}
