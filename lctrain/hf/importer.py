"""``lctrain import-hf``: a Hugging Face model folder (an lctrain export, or a native Qwen3-Next / Mamba2 / Bamba model
of lctrain's shape) as a run directory whose training starts from its weights.

The run directory gets ``config.yaml`` (the given config, its model section replaced by the one the folder
describes, ``checkpoint.init_from`` pointing at the weights), ``imported/model.safetensors`` (the single-device
lctrain state: lctrain's parameter names, model.vocab_size vocabulary rows) and ``tokenizer/tok.model`` (the
folder's sentencepiece model). Training then loads the weights into any parallel layout before its first step:

    deepspeed launch/train.py --config RUN_DIR/config.yaml
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile

from lctrain.config import ModelConfig, RunConfig, _build, check_config, dump_config
from lctrain.hf import native, remote
from lctrain.hf.consolidate import ConversionError
from lctrain.hf.export import check_output_folder, move_into_place
from lctrain.hf.weights import load_tensors, save_tensors

FORMATS = {f.model_type: f for f in (native.Qwen3Next, native.Mamba2, native.Bamba, remote.Remote)}
WEIGHTS = "imported"


def read_model(folder: pathlib.Path) -> tuple[ModelConfig, dict]:
    """(lctrain model config, single-device lctrain state with model.vocab_size rows) of an HF folder."""
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} is not a Hugging Face model folder (no config.json)")
    hf = json.loads((folder / "config.json").read_text())
    fmt = FORMATS.get(hf.get("model_type"))
    if fmt is None:
        raise ConversionError(f"{folder} holds a {hf.get('model_type')!r} model; lctrain imports "
                              f"{', '.join(FORMATS)} models")
    if "lctrain_model" in hf:  # written by convert-hf: every field, also those HF configs do not carry
        model = _build(ModelConfig, hf["lctrain_model"], "lctrain_model.")
    elif fmt.remote:
        raise ConversionError(f"{folder}/config.json has no lctrain_model section: it was not written by convert-hf")
    else:
        model = fmt.model_config(hf)
    try:
        tensors = {k: v.float() for k, v in load_tensors(folder).items()}
        full = fmt.from_hf(tensors, model)
    except (FileNotFoundError, KeyError, RuntimeError) as error:
        raise ConversionError(f"{folder} does not hold the tensors its config.json describes ({error})") from None
    return model, full


def import_model(model_dir: str | pathlib.Path, config: RunConfig, out: str | pathlib.Path, overwrite: bool = False,
                 log=print) -> pathlib.Path:
    folder, out = pathlib.Path(model_dir), pathlib.Path(out)
    check_output_folder(out, overwrite)
    model, full = read_model(folder)
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise ConversionError(f"{folder} has no tokenizer.model (a sentencepiece model), which lctrain's data "
                              f"pipeline needs")
    from lctrain.data.tokenizer import Tokenizer

    pieces = Tokenizer(tokenizer).vocab_size
    if pieces > model.vocab_size:
        raise ConversionError(f"{tokenizer} has {pieces} pieces but the model's vocabulary has {model.vocab_size} rows")
    check_shapes(model, full)
    config = dataclasses.replace(config, model=model, run_dir=str(out))
    config.tokenizer = dataclasses.replace(config.tokenizer, path="")
    config.checkpoint = dataclasses.replace(config.checkpoint, init_from="", resume="none")
    check_config(config)  # the imported model with the config's parallel layout
    config.checkpoint.init_from = str(out / WEIGHTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / WEIGHTS).mkdir()
        save_tensors(full, staging / WEIGHTS, 5 * 10**9)
        (staging / "tokenizer").mkdir()
        shutil.copyfile(tokenizer, staging / "tokenizer" / "tok.model")
        (staging / "config.yaml").write_text(dump_config(config))
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"imported {folder} ({model.pattern!r}, {sum(t.numel() for t in full.values()):,} parameters) into {out}; "
        f"train from it with: deepspeed launch/train.py --config {out / 'config.yaml'}")
    return out


def check_shapes(model: ModelConfig, full: dict) -> None:
    """The state must be exactly the parameters of lctrain's model of this config (built on the meta device)."""
    import torch

    from lctrain.model.hybrid import HybridModel, transformer_config
    from lctrain.parallel.groups import init_parallel

    init_parallel(1, 1)
    with torch.device("meta"):
        expected = {k: tuple(p.shape) for k, p in HybridModel(model, transformer_config(model)).named_parameters()}
    for name in ("embedding.weight", "output.weight"):
        if name in expected:
            expected[name] = (model.vocab_size, expected[name][1])
    got = {k: tuple(v.shape) for k, v in full.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ConversionError(f"the folder's tensors do not fit lctrain's model of pattern {model.pattern!r}: "
                              f"{', '.join(f'{k} {got.get(k)} vs {expected.get(k)}' for k in wrong[:3])}")

