"""Run configuration: one YAML file per run, loaded into typed dataclasses, with ``--set dotted.key=value`` overrides.

Every entry point loads its config through ``load_config``. Unknown keys, wrong types and impossible combinations
raise ``ConfigError`` with one line naming the key and what is allowed, before any work is done.
"""
from __future__ import annotations

import dataclasses
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and what is allowed."""


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GatedDeltaNetConfig:
    """Gated DeltaNet mixer (pattern symbol G), Qwen3-Next parameterisation."""

    num_heads: int = 4  # query/key heads H
    num_value_heads: int = 0  # value heads HV, a multiple of H; 0 means HV = H
    head_k_dim: int = 64
    head_v_dim: int = 64
    conv_size: int = 4


@dataclass
class GatedSlotAttentionConfig:
    """Gated Slot Attention mixer (pattern symbol S)."""

    num_heads: int = 4
    num_slots: int = 64
    head_k_dim: int = 0  # 0 means hidden_size / num_heads
    head_v_dim: int = 0  # 0 means hidden_size / num_heads
    gate_normalizer: float = 8.0  # the paper's damping of the forget gate: f = logsigmoid(W_f x) / gate_normalizer


@dataclass
class AttentionConfig:
    """Softmax attention: full causal (symbol *) and sliding-window (symbol W); both document-masked, with RoPE."""

    num_heads: int = 4
    num_kv_heads: int = 0  # 0 means num_heads (no grouped-query attention)
    head_dim: int = 0  # 0 means hidden_size / num_heads
    window: int = 512  # sliding-window size W for symbol W (each token sees itself and W - 1 earlier tokens)
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # RoPE on the first fraction of each head's channels (Qwen3-Next: 0.25)
    qk_norm: bool = False  # RMSNorm of each head's query and key (Qwen3-Next: true)
    output_gate: bool = False  # o * sigmoid(gate), gate projected with the query (Qwen3-Next: true)
    # symbols * and W only (auto: flex_attention on CUDA, blockwise SDPA on CPU); BST's in-block attention (B) always
    # takes flex on CUDA and SDPA per block elsewhere, since its blocks share the sliding window's mask builder
    backend: Literal["auto", "flex", "blockwise"] = "auto"


@dataclass
class Mamba2Config:
    """Mamba2 mixer (symbol M): SSD, the scalar-decay case of gated linear attention."""

    num_heads: int = 0  # 0 means expand * hidden_size / head_dim
    head_dim: int = 64
    state_size: int = 64
    num_groups: int = 1
    expand: int = 2
    conv_size: int = 4


@dataclass
class BlockStateConfig:
    """Block-State Transformer layer (symbol B): S4D SSM by FFT convolution feeding block attention."""

    variant: Literal["single_head", "multi_head", "multi_filter"] = "multi_filter"
    block_size: int = 64  # W: tokens per attention block
    num_context_states: int = 4  # S: context states each block attends to
    num_heads: int = 4
    ssm_state_size: int = 16  # N: complex diagonal state per channel


@dataclass
class ModelConfig:
    pattern: str = "G-W-"  # one symbol per sublayer; see lctrain.model.registry for the alphabet
    hidden_size: int = 256
    ffn_hidden_size: int = 0  # 0 means the SwiGLU default: 8/3 * hidden rounded up to a multiple of 64
    vocab_size: int = 0  # 0 means the tokenizer's vocabulary size
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    chunk_size: int = 64  # the chunk kernels' chunk length: sequences per context-parallel rank are a multiple
    gated_deltanet: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    gated_slot_attention: GatedSlotAttentionConfig = field(default_factory=GatedSlotAttentionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    block_state: BlockStateConfig = field(default_factory=BlockStateConfig)


# ----------------------------------------------------------------------------------------------------------------
# Data, tokenizer
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    path: str = ""  # a sentencepiece .model; empty means <run_dir>/tokenizer/tok.model, trained by train-tokenizer
    vocab_size: int = 2048
    model_type: Literal["bpe", "unigram"] = "bpe"
    training_sentences: int = 200000  # sentences sampled from the corpus to train the tokenizer


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)  # text / JSONL files; empty means the embedded default corpus
    dataset_dir: str = ""  # prepared shards; empty means <run_dir>/data
    seq_len: int = 512
    micro_batch_size: int = 1
    eval_fraction: float = 0.01
    seed: int = 1234


# ----------------------------------------------------------------------------------------------------------------
# Training, parallelism, DeepSpeed, logging, checkpoints
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # block: recompute each sublayer in backward; block_offload: the same, each sublayer's input waiting in host memory
    activation_checkpointing: Literal["none", "block", "block_offload"] = "none"
    # pattern symbols whose sublayers keep their activations on the GPU instead (no recompute, more memory), e.g. "W":
    # the attention's forward is the costliest to recompute per byte it keeps (benchmarks/NOTES.md, "Checkpointing
    # all but chosen sublayers"); without checkpointing it changes nothing
    activation_checkpointing_skip: str = ""
    loss_chunk_tokens: int = 4096  # loss computed over this many tokens at a time: full logits never materialise
    eval_interval: int = 50  # 0 disables evaluation
    eval_steps: int = 4


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    context_parallel_size: int = 1
    # the data-parallel size is world_size / (tensor_parallel_size * context_parallel_size)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    extra: dict = field(default_factory=dict)  # merged last into the generated DeepSpeed config (expert use)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    interval: int = 50  # steps between checkpoints; 0 disables periodic checkpoints (the final one is still written)
    keep_last: int = 2
    resume: str = "none"  # "none", "auto" (the latest in the run directory) or a checkpoint directory
    init_from: str = ""  # a folder of single-device weights (`lctrain import-hf`) loaded before the first step


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # Resolved paths (defaults live under the run directory).
    @property
    def tokenizer_path(self) -> pathlib.Path:
        return pathlib.Path(self.tokenizer.path or pathlib.Path(self.run_dir) / "tokenizer" / "tok.model")

    @property
    def dataset_dir(self) -> pathlib.Path:
        return pathlib.Path(self.data.dataset_dir or pathlib.Path(self.run_dir) / "data")


# ----------------------------------------------------------------------------------------------------------------
# Loading: strict, typed
# ----------------------------------------------------------------------------------------------------------------
def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".")
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config field type {tp} for {key}")
    raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _parse_value(text: str, tp):
    """A --set value: taken literally for string keys (patterns like '*-' are not YAML), else read as YAML."""
    if tp is str:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return text[1:-1] if quoted else text
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    node, parts = raw, dotted.strip().split(".")
    cls = RunConfig
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key '{dotted}' in --set; '{part}' is not a key of {where}; "
                              f"allowed: {', '.join(f.name for f in dataclasses.fields(cls))}")
        if i == len(parts) - 1:
            node[part] = _parse_value(text, hints[part])
        else:
            cls = hints[part]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section: cannot set {dotted}")
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' must be a mapping")
            node = child


def load_config(path: str | pathlib.Path | None, overrides: list[str] = (), validate: bool = True) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply ``--set`` overrides, check types and combinations."""
    raw: dict = {}
    if path is not None:
        p = pathlib.Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model:, train:, ...)")
    for assignment in overrides:
        _set_dotted(raw, assignment)
    config = _build(RunConfig, raw)
    if validate:
        check_config(config)
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Combinations
# ----------------------------------------------------------------------------------------------------------------
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_config(c: RunConfig, world_size: int | None = None) -> None:
    """Reject impossible combinations. ``world_size`` (known only at launch) adds the parallel-layout checks."""
    from lctrain.model.registry import LAYER_SYMBOLS  # the registry owns the alphabet

    m, d, t, p = c.model, c.data, c.train, c.parallel
    _require(len(m.pattern) > 0, "model.pattern is empty; give one symbol per sublayer, e.g. 'G-W-'")
    for i, s in enumerate(m.pattern):
        _require(s in LAYER_SYMBOLS, f"model.pattern has unknown symbol {s!r} at position {i}; allowed: "
                 + ", ".join(f"{k} ({v})" for k, v in LAYER_SYMBOLS.items()))
    positive = {
        "model.hidden_size": m.hidden_size, "model.chunk_size": m.chunk_size, "data.seq_len": d.seq_len,
        "data.micro_batch_size": d.micro_batch_size, "train.steps": t.steps, "train.grad_accum_steps": t.grad_accum_steps,
        "train.loss_chunk_tokens": t.loss_chunk_tokens, "parallel.tensor_parallel_size": p.tensor_parallel_size,
        "parallel.context_parallel_size": p.context_parallel_size, "logging.log_interval": c.logging.log_interval,
        "checkpoint.keep_last": c.checkpoint.keep_last, "tokenizer.vocab_size": c.tokenizer.vocab_size,
    }
    for key, value in positive.items():
        _require(value > 0, f"config key '{key}' must be a positive integer, got {value}")
    for key, value in {"model.vocab_size": m.vocab_size, "model.ffn_hidden_size": m.ffn_hidden_size,
                       "train.warmup_steps": t.warmup_steps, "train.eval_interval": t.eval_interval,
                       "checkpoint.interval": c.checkpoint.interval}.items():
        _require(value >= 0, f"config key '{key}' must be >= 0, got {value}")
    _require(t.lr > 0 and 0 <= t.min_lr <= t.lr, f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr; got lr={t.lr}, min_lr={t.min_lr}")
    _require(0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    for s in t.activation_checkpointing_skip:
        _require(s in m.pattern, f"train.activation_checkpointing_skip has symbol {s!r}, which model.pattern "
                 f"{m.pattern!r} does not use; allowed: symbols of the pattern ({''.join(sorted(set(m.pattern)))})")
    cp = p.context_parallel_size
    _require(d.seq_len % (m.chunk_size * cp) == 0,
             f"data.seq_len={d.seq_len} must be divisible by model.chunk_size x parallel.context_parallel_size = "
             f"{m.chunk_size} x {cp} = {m.chunk_size * cp}")
    local_len = d.seq_len // cp
    tp = p.tensor_parallel_size
    symbols = set(m.pattern)
    if symbols & {"*", "W"}:
        a = m.attention
        kv = a.num_kv_heads or a.num_heads
        _require(a.num_heads % kv == 0, f"model.attention.num_heads={a.num_heads} must be a multiple of num_kv_heads={kv}")
        _require(a.num_heads % tp == 0 and kv % tp == 0,
                 f"model.attention heads ({a.num_heads} query, {kv} key/value) must be divisible by parallel.tensor_parallel_size={tp}")
        _require(a.head_dim > 0 or m.hidden_size % a.num_heads == 0,
                 f"model.hidden_size={m.hidden_size} must be divisible by model.attention.num_heads={a.num_heads} (or set model.attention.head_dim)")
        if "W" in symbols:
            _require(a.window > 0, f"model.attention.window must be positive, got {a.window}")
            _require(cp == 1 or a.window <= local_len,
                     f"model.attention.window={a.window} must be <= the tokens per context-parallel rank ({local_len}): the halo comes from one neighbour")
    if "G" in symbols:
        g = m.gated_deltanet
        hv = g.num_value_heads or g.num_heads
        _require(hv % g.num_heads == 0, f"model.gated_deltanet.num_value_heads={hv} must be a multiple of num_heads={g.num_heads}")
        _require(g.num_heads % tp == 0, f"model.gated_deltanet.num_heads={g.num_heads} must be divisible by parallel.tensor_parallel_size={tp}")
        _require(g.head_k_dim <= 256 and g.head_v_dim <= 256, "model.gated_deltanet.head_k_dim and head_v_dim must be <= 256 (the kernels' limit)")
        _require(g.conv_size >= 1 and (cp == 1 or g.conv_size - 1 <= local_len), "model.gated_deltanet.conv_size must be >= 1")
    if "S" in symbols:
        s = m.gated_slot_attention
        _require(s.num_heads % tp == 0, f"model.gated_slot_attention.num_heads={s.num_heads} must be divisible by parallel.tensor_parallel_size={tp}")
        _require((s.head_k_dim and s.head_v_dim) or m.hidden_size % s.num_heads == 0,
                 f"model.hidden_size={m.hidden_size} must be divisible by model.gated_slot_attention.num_heads={s.num_heads}")
        _require(s.gate_normalizer > 0, "model.gated_slot_attention.gate_normalizer must be > 0")
    if "M" in symbols:
        mb = m.mamba2
        inner = mb.expand * m.hidden_size
        heads = mb.num_heads or inner // mb.head_dim
        _require(heads * mb.head_dim == inner, f"model.mamba2: num_heads x head_dim must equal expand x hidden_size = {inner}")
        _require(heads % mb.num_groups == 0 and heads % tp == 0 and mb.num_groups % tp == 0,
                 f"model.mamba2: heads ({heads}) must be divisible by num_groups ({mb.num_groups}); both by parallel.tensor_parallel_size={tp}")
    if "B" in symbols:
        b = m.block_state
        _require(local_len % b.block_size == 0,
                 f"model.block_state.block_size={b.block_size} must divide the tokens per context-parallel rank ({local_len}): blocks may not straddle ranks")
        _require(b.num_context_states >= 1, "model.block_state.num_context_states must be >= 1")
        _require(m.hidden_size % b.num_heads == 0 and b.num_heads % tp == 0,
                 f"model.block_state.num_heads={b.num_heads} must divide model.hidden_size and be divisible by parallel.tensor_parallel_size")
        if b.variant == "single_head":
            _require(b.num_context_states <= b.block_size, "model.block_state.num_context_states must be <= block_size for the single_head variant")
    if world_size is not None:
        _require(world_size % (tp * cp) == 0,
                 f"world size {world_size} must be divisible by parallel.tensor_parallel_size x context_parallel_size = {tp * cp}")
    _require(c.checkpoint.resume in ("none", "auto") or pathlib.Path(c.checkpoint.resume).is_dir(),
             f"checkpoint.resume={c.checkpoint.resume!r}: use 'none', 'auto' or an existing checkpoint directory")
    _require(not c.checkpoint.init_from or pathlib.Path(c.checkpoint.init_from).is_dir(),
             f"checkpoint.init_from={c.checkpoint.init_from!r}: use '' or a folder of weights written by `lctrain import-hf`")


def check_prepared_inputs(config: RunConfig) -> None:
    """What must exist before training starts (checked before anything is written)."""
    if not config.tokenizer_path.is_file():
        raise ConfigError(f"tokenizer {str(config.tokenizer_path)!r} does not exist; run `lctrain train-tokenizer` "
                          f"with this config first, or set tokenizer.path")
    if not (config.dataset_dir / "meta.json").is_file():
        raise ConfigError(f"no prepared dataset in {str(config.dataset_dir)!r}; run `lctrain prepare-data` with this "
                          f"config first, or set data.dataset_dir")
