"""Read an lctrain checkpoint back into full float32 tensors: DeepSpeed's ZeRO shards (stage 0-3, any data/context-
parallel size) per tensor-parallel rank, then the tensor-parallel shards joined (lctrain.hf.layout) into the state
of the single-device model, vocabulary padding dropped.

A checkpoint folder (lctrain.train.checkpoint) holds, per tensor-parallel rank m and ZeRO partition d (DeepSpeed's
data-parallel group: data x context-parallel ranks):
    mp_rank_<m>_model_states.pt                   module state, parameter shapes (ZeRO 0-2)
    zero_pp_rank_<d>_mp_rank_<m>_model_states.pt  the same, one per partition (ZeRO-3)
    [bf16_]zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt   the partition's flat float32 master weights
    rank_<r>.pt                                   lctrain's own per-rank state (one per process)
The float32 master weights are read through DeepSpeed's own zero_to_fp32 routines, one tensor-parallel rank at a
time (they know one model-parallel rank only). Without ZeRO optimizer files (ZeRO-0 in float32) the module state
holds the float32 weights itself; with bf16 it holds bfloat16 weights, the float32 masters being the optimizer's
``fp32_groups`` (one list per parameter group, in the order lctrain.train.loop.build_optimizer makes them, each
checked against the module's bfloat16 copy). A run directory made by ``lctrain import-hf`` and not trained yet reads as the
single-device weights it was given (``imported/``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import re

import torch

from lctrain.config import ConfigError, RunConfig, load_config
from lctrain.hf.layout import join_shards, split_rule
from lctrain.model.hybrid import padded_vocab_size
from lctrain.train.checkpoint import STEP_DIR, find_checkpoint


class ConversionError(ConfigError):
    """Bad input to convert-hf / import-hf: one line naming the problem and what is allowed (exit status 2)."""


@dataclasses.dataclass
class Checkpoint:
    path: pathlib.Path  # the step folder
    run_dir: pathlib.Path
    config: RunConfig  # the run's resolved config (model.vocab_size is the real vocabulary)
    step: int
    shards: list[dict[str, torch.Tensor]]  # per tensor-parallel rank: that rank's float32 parameters

    @property
    def tensor_parallel_size(self) -> int:
        return len(self.shards)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The single-device model's parameters, vocabulary rows beyond model.vocab_size dropped."""
        return join_tensor_parallel(self.shards, self.config)


def read_run_config(run_dir: pathlib.Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConversionError(f"{run_dir} has no config.yaml: give a run directory written by `lctrain train` "
                              f"(or one of its checkpoints/step_N folders)")
    config = load_config(path, validate=False)
    if config.model.vocab_size <= 0:
        raise ConversionError(f"{path} has model.vocab_size={config.model.vocab_size}: it was not written by a "
                              f"training run (which records the tokenizer's size)")
    return config


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(step folder, run directory) of RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_N."""
    path = pathlib.Path(path)
    if path.name.endswith(".partial"):
        raise ConversionError(f"checkpoint {path} is an interrupted save (a .partial folder); give the run directory "
                              f"or a complete checkpoints/step_N folder")
    if not path.is_dir():
        raise ConversionError(f"checkpoint {path} does not exist; give a run directory or its checkpoints/step_N folder")
    if STEP_DIR.match(path.name):
        return path, path.parent.parent
    root = path if path.name == "checkpoints" else path / "checkpoints"
    step_dir = find_checkpoint(root)
    if step_dir is None:
        raise ConversionError(f"{path} holds no complete checkpoint (no {root}/step_N folder)")
    return step_dir, root.parent


def _load(path: pathlib.Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: torch raises several kinds
        raise ConversionError(f"checkpoint file {path} cannot be read ({type(error).__name__}); the checkpoint is "
                              f"damaged or incomplete") from None


def _model_states_file(folder: pathlib.Path, mp_rank: int) -> pathlib.Path:
    for name in (f"mp_rank_{mp_rank:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"checkpoint {folder} is incomplete: no model states of tensor-parallel rank {mp_rank} "
                          f"(mp_rank_{mp_rank:02d}_model_states.pt)")


def _optimizer_files(folder: pathlib.Path, mp_rank: int, partitions: int) -> list[pathlib.Path]:
    """The ZeRO partitions' optimizer files of one tensor-parallel rank ([] without ZeRO optimizer state)."""
    found = {int(m.group(1)): folder / m.group(0) for f in folder.iterdir()
             if (m := re.fullmatch(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{mp_rank:02d}_optim_states\.pt", f.name))}
    if found and sorted(found) != list(range(partitions)):
        missing = sorted(set(range(partitions)) - set(found))
        raise ConversionError(f"checkpoint {folder} is incomplete: tensor-parallel rank {mp_rank} has optimizer "
                              f"shards {sorted(found)} of {partitions} (missing {missing})")
    return [found[d] for d in sorted(found)]


def _zero_master_weights(folder: pathlib.Path, model_files: list[pathlib.Path],
                         optim_files: list[pathlib.Path]) -> dict[str, torch.Tensor]:
    """DeepSpeed's own reconstruction of one model-parallel rank's float32 weights from its ZeRO partitions."""
    from deepspeed.utils import zero_to_fp32 as z

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        states = z.parse_model_states([str(f) for f in model_files])
        optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
        stage = int(optim[0].get(z.ZERO_STAGE, 2))  # DeepSpeed's bf16 optimizer (ZeRO-0) has a stage-2 layout
        partitions = optim[0][z.PARTITION_COUNT]
        partitions = max(partitions) if isinstance(partitions, list) else partitions
        if partitions != len(optim_files):
            raise ConversionError(f"checkpoint {folder} is incomplete: {len(optim_files)} optimizer shards of "
                                  f"{partitions}")
        if stage <= 2:
            flat = [o[z.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]
            state = z._get_fp32_state_dict_from_zero2_checkpoint(partitions, flat, states, False,
                                                                 optim[0].get(z.PARAM_ALIGNMENT_PADDINGS))
        else:
            flat = [o[z.FP32_FLAT_GROUPS] for o in optim]
            state = z._get_fp32_state_dict_from_zero3_checkpoint(partitions, flat, states, False)
        return {k: v.detach().float().clone() for k, v in z.to_torch_tensor(state).items()}


def _zero0_master_weights(folder: pathlib.Path, states: dict) -> dict[str, torch.Tensor]:
    """Without ZeRO: the module's weights, or (bf16 training) the optimizer's float32 masters of them."""
    module = {k: v for k, v in states["module"].items() if isinstance(v, torch.Tensor)}
    if any(v.numel() == 0 for v in module.values()):
        raise ConversionError(f"checkpoint {folder} has no optimizer shards but a partitioned module state: it is incomplete")
    if all(v.dtype == torch.float32 for v in module.values()):
        return {k: v.detach().clone() for k, v in module.items()}
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    # lctrain.train.loop.build_optimizer: group 0 the matmul weights (decayed), group 1 the rest
    decayed = [k for k, v in module.items() if v.dim() >= 2 and "conv" not in k]
    groups = [decayed, [k for k in module if k not in decayed]]
    if not masters or [len(g) for g in masters] != [len(g) for g in groups]:
        raise ConversionError(f"checkpoint {folder} holds {next(iter(module.values())).dtype} weights without their "
                              f"float32 masters: it is incomplete")
    shard = {}
    for names, tensors in zip(groups, masters):
        for name, master in zip(names, tensors):
            if master.shape != module[name].shape or not torch.equal(master.to(module[name].dtype), module[name]):
                raise ConversionError(f"checkpoint {folder}: the optimizer's float32 weights do not match the module's "
                                      f"{name}; the checkpoint was not written by lctrain's training loop")
            shard[name] = master.detach().float().clone()
    return shard


def load_imported(run_dir: pathlib.Path) -> Checkpoint:
    """The weights ``lctrain import-hf`` put into a run directory, as a one-rank checkpoint of step 0."""
    from lctrain.hf.weights import load_tensors

    config = read_run_config(run_dir)
    folder = pathlib.Path(config.checkpoint.init_from or run_dir / "imported")
    try:
        full = load_tensors(folder)
    except FileNotFoundError as error:
        raise ConversionError(str(error)) from None
    padded = padded_vocab_size(config.model.vocab_size, 1)
    for name in ("embedding.weight", "output.weight"):
        if name in full:
            full[name] = torch.cat([full[name], full[name].new_zeros(padded - full[name].shape[0], full[name].shape[1])])
    return Checkpoint(folder, run_dir, config, 0, [full])


def load_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """Find, check and read a checkpoint (see the module docstring); every problem is a one-line ConversionError."""
    path = pathlib.Path(path)
    if (path / "imported").is_dir() and find_checkpoint(path / "checkpoints") is None:
        return load_imported(path)
    folder, run_dir = resolve(path)
    config = read_run_config(run_dir)
    tp = config.parallel.tensor_parallel_size
    shards, world = [], None
    for mp_rank in range(tp):
        states_file = _model_states_file(folder, mp_rank)
        states = _load(states_file)
        partitions, saved_tp = int(states.get("dp_world_size", 1)), int(states.get("mp_world_size", 1))
        if saved_tp != tp:
            raise ConversionError(f"checkpoint {folder} was written with {saved_tp} tensor-parallel ranks but "
                                  f"{run_dir / 'config.yaml'} says parallel.tensor_parallel_size={tp}")
        world = partitions * tp
        model_files = [states_file] if states_file.name.startswith("mp_rank") else \
            [folder / f"zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_model_states.pt" for d in range(partitions)]
        for f in model_files:
            if not f.is_file():
                raise ConversionError(f"checkpoint {folder} is incomplete: {f.name} is missing")
        optim_files = _optimizer_files(folder, mp_rank, partitions)
        shards.append(_zero_master_weights(folder, model_files, optim_files) if optim_files
                      else _zero0_master_weights(folder, states))
    missing = [r for r in range(world) if not (folder / f"rank_{r}.pt").is_file()]
    if missing:
        raise ConversionError(f"checkpoint {folder} is incomplete: rank files {['rank_%d.pt' % r for r in missing]} "
                              f"of {world} are missing")
    step = int(m.group(1)) if (m := STEP_DIR.match(folder.name)) else 0
    return Checkpoint(folder, run_dir, config, step, shards)


def join_tensor_parallel(shards: list[dict[str, torch.Tensor]], config: RunConfig) -> dict[str, torch.Tensor]:
    """The single-device state from per-rank shards; the embedding (and untied output) keep model.vocab_size rows."""
    model = config.model
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], 1):
        if list(shard) != names:
            raise ConversionError(f"tensor-parallel rank {r} holds different parameters than rank 0; the checkpoint "
                                  f"does not belong to this run's config")
    full = {}
    for name in names:
        rule = split_rule(name, model) if len(shards) > 1 else None
        full[name] = join_shards([s[name] for s in shards], rule).contiguous()
    padded = padded_vocab_size(model.vocab_size, len(shards))
    for name in ("embedding.weight", "output.weight"):
        if name in full:
            if full[name].shape[0] != padded:
                raise ConversionError(f"{name} has {full[name].shape[0]} rows, but model.vocab_size="
                                      f"{model.vocab_size} pads to {padded}: the checkpoint does not belong to this config")
            full[name] = full[name][: model.vocab_size].clone()
    return full
