"""Safetensors folders (one file, or shards with a ``model.safetensors.index.json`` above a size limit) and the
loading of a single-device lctrain state into a model of any tensor-parallel layout (``checkpoint.init_from``)."""
from __future__ import annotations

import json
import pathlib
import re

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def save_tensors(tensors: dict[str, torch.Tensor], folder: pathlib.Path, max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` as model.safetensors, or as model-0000i-of-0000n.safetensors shards of at most
    max_shard_bytes each (a larger tensor gets a shard of its own) plus the index; returns the file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def tensor_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a folder (from its index when sharded); [] when it has none."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / SINGLE] if (folder / SINGLE).is_file() else []


def load_tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in tensor_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is incomplete: {path.name} (named by its index) is missing")
        tensors.update(load_file(str(path)))
    if not tensors:
        raise FileNotFoundError(f"{folder} holds no {SINGLE} (or {INDEX})")
    return tensors


@torch.no_grad()
def load_full_state(model, folder: str | pathlib.Path) -> None:
    """Copy a single-device lctrain state (as ``lctrain import-hf`` writes it: model.vocab_size vocabulary rows)
    into ``model``, a HybridModel of any tensor-parallel layout: each rank takes its shard (lctrain.hf.layout);
    vocabulary padding rows become zero (they are never targets)."""
    from megatron.core import parallel_state

    from lctrain.hf.layout import cut_shard, split_rule

    full = load_tensors(pathlib.Path(folder))
    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    if set(params) != set(full):
        raise ValueError(f"the weights in {folder} do not fit this model: missing {sorted(set(params) - set(full))[:3]}, "
                         f"unexpected {sorted(set(full) - set(params))[:3]}")
    for name, param in params.items():
        tensor = full[name]
        if name in ("embedding.weight", "output.weight"):
            tensor = torch.cat([tensor, tensor.new_zeros(model.padded_vocab_size - tensor.shape[0], tensor.shape[1])])
        shard = cut_shard(tensor, split_rule(name, model.model_config) if size > 1 else None, rank, size)
        if shard.shape != param.shape:
            raise ValueError(f"{name} in {folder} has shape {tuple(tensor.shape)}, which does not fit this model's "
                             f"{tuple(param.shape)} per rank")
        param.copy_(shard.to(param.dtype))
