"""``lctrain convert-hf``: an lctrain checkpoint as a Hugging Face model folder.

Steps: check the inputs (checkpoint complete, tokenizer fits the vocabulary, output folder free); consolidate the
ZeRO and tensor-parallel shards (lctrain.hf.consolidate); map the tensors onto a native architecture where one fits
(lctrain.hf.native: Qwen3-Next, Mamba2, Bamba), else onto the remote-code model (lctrain.hf.remote); write config.json,
generation_config.json, the safetensors and the tokenizer into a staging folder beside the output; check that the
exported model computes lctrain's logits (lctrain.hf.verify); then move the folder into place. Any failure removes
the staging folder: the output is either the complete, checked export or untouched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import torch

from lctrain.config import ModelConfig, RunConfig
from lctrain.hf import native, remote
from lctrain.hf.consolidate import Checkpoint, ConversionError, load_checkpoint
from lctrain.hf.tokenizer import check_same_encoding, special_tokens, write_hf_tokenizer
from lctrain.hf.verify import TOLERANCE, max_logit_difference
from lctrain.hf.weights import load_tensors, save_tensors, tensor_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def choose_format(model: ModelConfig):
    """(format class, why no native architecture fits: None when one does)."""
    reasons = []
    for fmt, misfit in ((native.Qwen3Next, native.qwen3_next_misfit), (native.Mamba2, native.mamba2_misfit),
                        (native.Bamba, native.bamba_misfit)):
        reason = misfit(model)
        if reason is None:
            return fmt, None
        reasons.append(f"not {fmt.name.removesuffix('ForCausalLM')}: {reason}")
    return remote.Remote, "; ".join(reasons)


def check_output_folder(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


def run_tokenizer(config: RunConfig, run_dir: pathlib.Path) -> pathlib.Path:
    """The run's tokenizer, checked against the model's vocabulary and the data it was trained on."""
    from lctrain.data.tokenizer import Tokenizer

    candidates = [config.tokenizer_path] + ([] if config.tokenizer.path else [run_dir / "tokenizer" / "tok.model"])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConversionError(f"tokenizer {config.tokenizer_path} does not exist; the export needs the run's "
                              f"sentencepiece model (tokenizer.path in {run_dir / 'config.yaml'})")
    try:
        tokenizer = Tokenizer(path)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConversionError(f"tokenizer {path} has {tokenizer.vocab_size} pieces but the model's vocabulary has "
                              f"{config.model.vocab_size} rows: it is not this model's tokenizer")
    data = [config.dataset_dir] + ([] if config.data.dataset_dir else [run_dir / "data"])
    meta = next((d / "meta.json" for d in data if (d / "meta.json").is_file()), None)
    if meta is not None:
        expected = json.loads(meta.read_text()).get("tokenizer", {}).get("sha256")
        if expected and expected != hashlib.sha256(path.read_bytes()).hexdigest():
            raise ConversionError(f"tokenizer {path} is not the one the training data {meta.parent} was prepared with "
                                  f"(its sha256 differs): it does not match the model's vocabulary")
    return path


def common_config(model: ModelConfig, tokenizer: pathlib.Path, ckpt: Checkpoint) -> dict:
    ids = {name: i for name, (_, i) in special_tokens(tokenizer).items()}
    return {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad"),
            "dtype": "float32", "use_cache": True, "lctrain_model": dataclasses.asdict(model),
            "lctrain_source": {"checkpoint": str(ckpt.path), "step": ckpt.step}}


def write_generation_config(folder: pathlib.Path, hf_config: dict) -> None:
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def _cast_tensors(folder: pathlib.Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    tensors = {k: v.to(dtype) for k, v in load_tensors(folder).items()}
    for f in tensor_files(folder) + [folder / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    save_tensors(tensors, folder, max_shard_bytes)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def move_into_place(staging: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def write_folder(folder: pathlib.Path, fmt, model: ModelConfig, full: dict[str, torch.Tensor], common: dict,
                 tokenizer: pathlib.Path, max_shard_bytes: int) -> None:
    """Everything of an export folder, tensors in float32."""
    hf_config = fmt.hf_config(model, common)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_generation_config(folder, hf_config)
    save_tensors(fmt.to_hf(full, model), folder, max_shard_bytes)
    if fmt.remote:
        remote.Remote.write_code(folder)
    write_hf_tokenizer(tokenizer, folder)
    check_same_encoding(tokenizer, folder, fmt.remote)


def convert(checkpoint: str | pathlib.Path, out: str | pathlib.Path, dtype: str = "fp32", overwrite: bool = False,
            verify: bool = True, max_shard_bytes: int = 5 * 10**9, log=print) -> dict:
    """Export; returns a summary (format, step, max logit difference or None). Bad input: ConversionError."""
    out = pathlib.Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    check_output_folder(out, overwrite)
    return export(load_checkpoint(checkpoint), out, dtype, verify, max_shard_bytes, log)


def export(ckpt: Checkpoint, out: pathlib.Path, dtype: str = "fp32", verify: bool = True,
           max_shard_bytes: int = 5 * 10**9, log=print) -> dict:
    """The export of a read checkpoint into ``out`` (checked by ``convert``: absent, empty or to be replaced)."""
    model = ckpt.config.model
    tokenizer = run_tokenizer(ckpt.config, ckpt.run_dir)
    fmt, misfit = choose_format(model)
    log(f"checkpoint {ckpt.path} (step {ckpt.step}, {ckpt.tensor_parallel_size} tensor-parallel shard(s)) -> "
        f"{fmt.name}" + (f" (remote code; {misfit})" if misfit else " (native transformers architecture)"))
    full = ckpt.full_state()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_folder(staging, fmt, model, full, common_config(model, tokenizer, ckpt), tokenizer, max_shard_bytes)
        difference = None
        if verify:
            difference = max_logit_difference(model, ckpt.shards, staging, fmt.remote)
            if not difference <= TOLERANCE:
                raise ConversionError(f"verification failed: the exported model's logits differ from lctrain's by "
                                      f"{difference:.3g} (> {TOLERANCE}); nothing was written to {out}")
            log(f"verified: max |logit difference| {difference:.2e} <= {TOLERANCE} (float32, {fmt.name} vs lctrain)")
        if dtype != "fp32":
            _cast_tensors(staging, DTYPES[dtype], max_shard_bytes)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"written to {out}")
    return {"format": fmt.name, "step": ckpt.step, "max_logit_difference": difference, "out": str(out)}
