"""Hugging Face conversion on CPU: tiny models trained with real multi-process runs (ZeRO-2, ZeRO-3, context
parallelism, tensor parallelism), exported with `lctrain convert-hf`, loaded with transformers in a fresh process and
compared with lctrain's logits (<= 1e-4, float32); generate() with and without the cache; import and re-export;
the bad inputs. Every layout is trained once per module and shared.

Subprocesses run without TRITON_INTERPRET (lctrain's kernels take their torch paths on CPU, as `make demo` does).
This file is also the fresh-process checker the tests call: ``python tests/test_hf.py check|variants ...``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    "model.hidden_size=64", "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_k_dim=16",
    "model.gated_deltanet.head_v_dim=16", "model.attention.num_heads=2", "model.attention.window=8",
    "model.gated_slot_attention.num_heads=2", "model.gated_slot_attention.num_slots=8", "model.mamba2.head_dim=16",
    "model.mamba2.state_size=8", "model.mamba2.num_groups=2", "model.block_state.block_size=8",
    "model.block_state.num_heads=2", "model.block_state.num_context_states=2", "model.block_state.ssm_state_size=4",
    "model.chunk_size=16",
]
TRAIN = ["data.seq_len=64", "data.micro_batch_size=2", "train.lr=3e-3", "train.warmup_steps=1", "train.eval_interval=0",
         "logging.log_interval=1", "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.interval=0"]
QWEN = ["model.attention.qk_norm=true", "model.attention.output_gate=true", "model.attention.rope_fraction=0.5",
        "model.gated_deltanet.num_value_heads=4"]
# name: (pattern, overrides, the architecture the export must be, convert-hf options)
LAYOUTS = {
    "remote_zero2": ("G-S-M-B-W-*-", ["deepspeed.zero_stage=2", "train.steps=6"], "LctrainForCausalLM", []),
    "qwen3_next_zero3": ("G-*-", ["deepspeed.zero_stage=3", "train.steps=4", *QWEN], "Qwen3NextForCausalLM",
                         ["--max-shard-size", "100KB"]),
    "mamba2_cp2": ("MM", ["deepspeed.zero_stage=2", "parallel.context_parallel_size=2", "train.steps=4"],
                   "Mamba2ForCausalLM", ["--dtype", "bf16"]),
}
TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**clean, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf_modules"))}


def run(args, env, check=True, timeout=900):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[:3]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}")
    return result


def lctrain(env, *args, check=True):
    return run(["-m", "lctrain.cli", *args], env, check=check)


def torchrun(env, *args):
    return run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                ROOT / "launch" / "train.py", *args], env)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, env):
    """Tokenizer and token shards from a slice of the standard library."""
    from lctrain.data.corpus import default_corpus_files

    root = tmp_path_factory.mktemp("prepared")
    inputs = "[" + ", ".join(str(p) for p in default_corpus_files()[:40]) + "]"
    common = sets([f"run_dir={root}", "tokenizer.vocab_size=512", f"data.inputs={inputs}", "data.eval_fraction=0.1"])
    lctrain(env, "train-tokenizer", *common)
    lctrain(env, "prepare-data", *common)
    return [f"tokenizer.path={root / 'tokenizer' / 'tok.model'}", f"data.dataset_dir={root / 'data'}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env, prepared):
    runs = {}

    def get(name: str) -> pathlib.Path:
        if name not in runs:
            pattern, overrides, _, _ = LAYOUTS[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            torchrun(env, *sets([f"run_dir={run_dir}", f"model.pattern={pattern}", *TINY, *TRAIN, *prepared, *overrides]))
            runs[name] = run_dir
        return runs[name]

    return get


@pytest.fixture(scope="module")
def exported(tmp_path_factory, env, trained):
    folders = {}

    def get(name: str) -> tuple[pathlib.Path, pathlib.Path, str]:
        if name not in folders:
            run_dir = trained(name)
            out = tmp_path_factory.mktemp(name + "_hf") / "hf"
            result = lctrain(env, "convert-hf", "--checkpoint", run_dir, "--out", out, *LAYOUTS[name][3])
            folders[name] = (run_dir, out, result.stdout)
        return folders[name]

    return get


def tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from lctrain.hf.weights import load_tensors

    return load_tensors(folder)


# ---------------------------------------------------------------------------------------------------------------
# Trained layouts: export, fresh-process load, logits, generation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_loads_in_a_fresh_process_and_matches_lctrain(name, exported, env, tmp_path):
    run_dir, out, stdout = exported(name)
    architecture, options = LAYOUTS[name][2], LAYOUTS[name][3]
    assert "verified: max |logit difference|" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    remote = architecture == "LctrainForCausalLM"
    assert ("auto_map" in config) == remote
    assert (out / "modeling_lctrain.py").is_file() == remote
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (out / f).is_file(), f
    assert config["vocab_size"] == 512 and config["eos_token_id"] == 2
    if "--max-shard-size" in options:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    bf16 = "bf16" in options
    if bf16:
        assert config["dtype"] == "bfloat16"
        assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    result_file = tmp_path / "result.json"
    run([__file__, "check", run_dir, out, result_file, "bf16" if bf16 else "fp32"], env)
    result = json.loads(result_file.read_text())
    assert result["logit_difference"] <= TOLERANCE, result
    assert result["tokenizer_ids"] == result["lctrain_ids"]
    assert result["new_tokens"] == 20
    assert result["with_cache"] == result["without_cache"]
    assert result["incremental_difference"] <= TOLERANCE, result


@pytest.mark.slow
def test_import_trains_with_tensor_parallelism_and_round_trips(exported, env, prepared, tmp_path):
    """An export imported, re-exported unchanged; then trained at tensor_parallel_size 2 (ZeRO-3) from the imported
    weights with a negligible learning rate and exported again: the same model, the TP=2 checkpoint verified
    against lctrain's TP=2 model, its shards exactly those the loader cuts from the single-device weights."""
    from lctrain.hf.consolidate import load_checkpoint
    from lctrain.hf.layout import cut_shard, split_rule

    _, original, _ = exported("remote_zero2")
    imported = tmp_path / "imported"
    steps = ["parallel.tensor_parallel_size=2", "deepspeed.zero_stage=3", "train.steps=2", "train.lr=1e-9",
             "train.min_lr=0", *TRAIN[:2], *TRAIN[3:], *prepared]
    lctrain(env, "import-hf", "--model", original, "--out", imported, *sets(steps))
    assert (imported / "imported" / "model.safetensors").is_file() and (imported / "tokenizer" / "tok.model").is_file()

    again = tmp_path / "again"
    lctrain(env, "convert-hf", "--checkpoint", imported, "--out", again)
    before, after = tensors(original), tensors(again)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    torchrun(env, "--config", imported / "config.yaml")
    continued = tmp_path / "continued"
    result = lctrain(env, "convert-hf", "--checkpoint", imported, "--out", continued)
    assert "2 tensor-parallel shard(s)" in result.stdout and "verified" in result.stdout
    after = tensors(continued)
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6

    ckpt = load_checkpoint(imported)
    full = ckpt.full_state()
    for rank, shard in enumerate(ckpt.shards):
        for key, value in shard.items():
            whole = full[key]
            if key == "embedding.weight":
                whole = torch.cat([whole, whole.new_zeros(value.shape[0] * 2 - whole.shape[0], whole.shape[1])])
            assert torch.equal(cut_shard(whole, split_rule(key, ckpt.config.model), rank, 2), value), key


@pytest.mark.slow
def test_native_qwen3_next_folder_imports_and_round_trips(exported, env, prepared, tmp_path):
    """A Qwen3-Next folder without lctrain's own config section (as from elsewhere) imports and re-exports to the
    same tensors."""
    _, original, _ = exported("qwen3_next_zero3")
    hub = tmp_path / "hub"
    shutil.copytree(original, hub)
    config = json.loads((hub / "config.json").read_text())
    del config["lctrain_model"], config["lctrain_source"]
    (hub / "config.json").write_text(json.dumps(config))
    imported = tmp_path / "imported"
    lctrain(env, "import-hf", "--model", hub, "--out", imported, *sets(["model.chunk_size=16", *prepared]))
    again = tmp_path / "again"
    result = lctrain(env, "convert-hf", "--checkpoint", imported, "--out", again)
    assert "Qwen3NextForCausalLM (native" in result.stdout and "verified" in result.stdout
    before, after = tensors(original), tensors(again)
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------------------------
def _fails(capsys, args: list, out: pathlib.Path, contains: str) -> None:
    from lctrain.cli import main

    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lctrain: error:") and contains in err[0], err
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    assert before == after, "something was written"


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_write_nothing(trained, tmp_path, capsys):
    from lctrain.data.corpus import default_corpus_files
    from lctrain.data.tokenizer import train_tokenizer

    source = trained("remote_zero2")
    out = tmp_path / "outputs" / "hf"
    out.parent.mkdir()

    def copy(name):
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir)
        return run_dir, run_dir / "checkpoints" / "step_00000006"

    _fails(capsys, ["convert-hf", "--checkpoint", tmp_path / "missing", "--out", out], out, "does not exist")

    run_dir, step = copy("no_shard")
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _fails(capsys, ["convert-hf", "--checkpoint", run_dir, "--out", out], out, "incomplete")
    run_dir, step = copy("no_rank_file")
    (step / "rank_1.pt").unlink()
    _fails(capsys, ["convert-hf", "--checkpoint", step, "--out", out], out, "incomplete")
    run_dir, step = copy("truncated")
    (step / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, ["convert-hf", "--checkpoint", run_dir, "--out", out], out, "cannot be read")
    run_dir, step = copy("interrupted")
    partial = step.with_name(".step_00000006.partial")
    step.rename(partial)
    _fails(capsys, ["convert-hf", "--checkpoint", partial, "--out", out], out, "interrupted save")
    _fails(capsys, ["convert-hf", "--checkpoint", run_dir, "--out", out], out, "no complete checkpoint")

    files = default_corpus_files()[:20]
    for name, vocab, contains in (("bigger", 1024, "pieces"), ("other", 512, "not the one")):
        model = train_tokenizer(files, tmp_path / "tokenizers" / name, vocab, input_sentence_size=200, seed=7)
        run_dir, _ = copy("tokenizer_" + name)
        config = (run_dir / "config.yaml").read_text()
        old = next(line for line in config.splitlines() if line.strip().startswith("path:") and ".model" in line)
        (run_dir / "config.yaml").write_text(config.replace(old, f"  path: {model}"))
        _fails(capsys, ["convert-hf", "--checkpoint", run_dir, "--out", out], out, contains)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["convert-hf", "--checkpoint", source, "--out", out], out / "keep.txt", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    _fails(capsys, ["import-hf", "--model", tmp_path / "missing", "--out", tmp_path / "outputs" / "run"],
           tmp_path / "outputs" / "run", "no config.json")
    _fails(capsys, ["import-hf", "--model", source, "--out", out], out / "keep.txt", "--overwrite")


# ---------------------------------------------------------------------------------------------------------------
# Without training: layer variants, tensor-parallel rules, safetensors shards, tokenizer files
# ---------------------------------------------------------------------------------------------------------------
VARIANTS = {
    "block_state_single_head": ("B-*-", ["model.block_state.variant=single_head"]),
    "block_state_multi_head": ("B-W-", ["model.block_state.variant=multi_head"]),
    "options": ("W-G-*-S-M-", ["model.attention.qk_norm=true", "model.attention.output_gate=true",
                               "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
                               "model.attention.rope_fraction=0.25", "model.tie_embeddings=false",
                               "model.gated_deltanet.num_value_heads=4"]),
    "qwen3_next_untied": ("G-*-G-*-", [*QWEN, "model.tie_embeddings=false", "model.attention.rope_fraction=0.25"]),
    "bamba": ("M-*-M-", ["model.attention.rope_fraction=0.5", "model.attention.num_heads=4",
                         "model.attention.num_kv_heads=2"]),
}


@pytest.mark.slow
def test_layer_variants_export_exactly(prepared, env, tmp_path):
    """Random (untrained) models of the variants no trained layout covers: exported with verification, then
    incremental decoding against the full forward."""
    result_file = tmp_path / "variants.json"
    run([__file__, "variants", tmp_path, result_file, *prepared], env)
    results = json.loads(result_file.read_text())
    assert set(results) == set(VARIANTS)
    for name, r in results.items():
        assert r["logit_difference"] <= TOLERANCE and r["incremental_difference"] <= TOLERANCE, (name, r)
    assert results["qwen3_next_untied"]["format"] == "Qwen3NextForCausalLM"
    assert results["bamba"]["format"] == "BambaForCausalLM"
    assert results["options"]["format"] == "LctrainForCausalLM"


@pytest.mark.slow
def test_zero0_bf16_and_zero1_checkpoints_export_their_float32_masters(prepared, env, tmp_path):
    """One-process training runs (ZeRO-0 in bfloat16: DeepSpeed keeps the float32 masters in the optimizer's
    fp32_groups; ZeRO-1 in float32), exported and verified."""
    result_file = tmp_path / "zero.json"
    run([__file__, "zero", tmp_path, result_file, *prepared], env)
    results = json.loads(result_file.read_text())
    assert set(results) == {"0-bf16", "1-fp32"}
    for name, r in results.items():
        assert r["logit_difference"] <= TOLERANCE, (name, r)
    assert results["0-bf16"]["masters_differ_from_module"]  # the export used the float32 masters, not bf16 copies


def test_tensor_parallel_rules_cut_and_join_inverse():
    from lctrain.config import ModelConfig
    from lctrain.hf.layout import RULES, TOP_LEVEL, Split, cut_shard, join_shards

    models = [ModelConfig(), ModelConfig()]
    models[1].attention.output_gate = True
    rules = {r(m) if callable(r) else r for table in (*RULES.values(), TOP_LEVEL) for r in table.values() for m in models}
    rules.discard(None)
    assert Split(0, 2) in rules and Split(0, 3) in rules and Split(1, 2) in rules
    for rule in rules:
        full = torch.randn(24, 16) if rule.dim == 0 else torch.randn(16, 24)
        for size in (1, 2, 3):
            shards = [cut_shard(full, rule, r, size) for r in range(size)]
            assert torch.equal(join_shards(shards, rule), full)
            # each shard holds the rank's slice of every part
            part = full.chunk(rule.parts, rule.dim)[-1].chunk(size, rule.dim)[0]
            assert torch.equal(shards[0].chunk(rule.parts, rule.dim)[-1], part)


def test_sharded_safetensors_and_sizes(tmp_path):
    from lctrain.hf.weights import load_tensors, parse_size, save_tensors

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("1000") == 1000
    for bad in ("lots", "-1GB", "5XB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    state = {f"w{i}": torch.randn(100, 10) for i in range(5)}
    names = save_tensors(state, tmp_path, max_shard_bytes=9000)  # 4000 bytes each: two per shard
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 4000 and set(index["weight_map"]) == set(state)
    loaded = load_tensors(tmp_path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_files_encode_like_lctrain(tmp_path, model_type):
    from transformers import AutoTokenizer

    from lctrain.data.corpus import default_corpus_files
    from lctrain.data.tokenizer import Tokenizer, train_tokenizer
    from lctrain.hf.tokenizer import check_same_encoding, write_hf_tokenizer

    files = default_corpus_files()[:20]
    model = train_tokenizer(files, tmp_path / "tok", 400, model_type=model_type, input_sentence_size=200)
    write_hf_tokenizer(model, tmp_path / "hf")
    check_same_encoding(model, tmp_path / "hf", trust_remote_code=False)
    ours, theirs = Tokenizer(model), AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in (p.read_text()[:2000] for p in default_corpus_files()[40:46]):
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 3)


# ---------------------------------------------------------------------------------------------------------------
# Fresh-process checkers (python tests/test_hf.py ...)
# ---------------------------------------------------------------------------------------------------------------
def _incremental_difference(model, sequence: torch.Tensor) -> float:
    """Logits of the whole sequence at once vs. fed in pieces through the cache (a prompt, a chunk, then tokens).
    Positions are passed as generate() does (some transformers models count them from 0 otherwise)."""
    name = "cache_params" if type(model).__name__ == "Mamba2ForCausalLM" else "past_key_values"
    with torch.no_grad():
        full = model(sequence, use_cache=False).logits
        cuts = [0, 7, 40] + list(range(41, sequence.shape[1] + 1))
        cache, pieces = None, []
        for a, b in zip(cuts, cuts[1:]):
            positions = torch.arange(a, b)[None].expand(sequence.shape[0], -1)
            out = model(sequence[:, a:b], use_cache=True, position_ids=positions, **{name: cache})
            cache = getattr(out, name)
            pieces.append(out.logits)
    return (torch.cat(pieces, 1) - full).abs().max().item()


def _check(run_dir, hf_dir, result_file, precision) -> None:
    """Load the export in this fresh process; compare its logits with lctrain's (weights rounded to bfloat16 for a
    bfloat16 export), its tokenizer with lctrain's, generate() with and without the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lctrain.data.tokenizer import Tokenizer
    from lctrain.hf.consolidate import load_checkpoint
    from lctrain.hf.export import run_tokenizer
    from lctrain.hf.verify import lctrain_logits, sample_tokens

    run_dir, hf_dir = pathlib.Path(run_dir), pathlib.Path(hf_dir)
    ckpt = load_checkpoint(run_dir)
    remote = "auto_map" in json.loads((hf_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=remote, dtype=torch.float32).eval()
    tokens = sample_tokens(ckpt.config.model, seed=1)
    shards = ckpt.shards if precision == "fp32" else [{k: v.bfloat16().float() for k, v in s.items()} for s in ckpt.shards]
    ours = lctrain_logits(ckpt.config.model, shards, tokens)
    with torch.no_grad():
        theirs = model(tokens, use_cache=False).logits
    text = "def main():\n    parser = argparse.ArgumentParser(description=__doc__)\n"
    lctrain_ids = Tokenizer(run_tokenizer(ckpt.config, run_dir)).encode(text)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=remote)
    prompt = torch.tensor([lctrain_ids, lctrain_ids[::-1]])
    generate = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with_cache = model.generate(prompt, use_cache=True, **generate)
    without_cache = model.generate(prompt, use_cache=False, **generate)
    result = {"logit_difference": (theirs - ours).abs().max().item(),
              "tokenizer_ids": tokenizer(text, add_special_tokens=False)["input_ids"], "lctrain_ids": lctrain_ids,
              "new_tokens": with_cache.shape[1] - prompt.shape[1], "with_cache": with_cache.tolist(),
              "without_cache": without_cache.tolist(), "incremental_difference": _incremental_difference(model, with_cache)}
    pathlib.Path(result_file).write_text(json.dumps(result))


def _variants(folder, result_file, *prepared) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM

    from lctrain.config import load_config
    from lctrain.hf.consolidate import Checkpoint
    from lctrain.hf.export import export
    from lctrain.model.hybrid import HybridModel, transformer_config
    from lctrain.parallel.groups import init_parallel

    init_parallel()
    results = {}
    for name, (pattern, overrides) in VARIANTS.items():
        config = load_config(None, [*TINY, "data.seq_len=64", "model.vocab_size=512", f"model.pattern={pattern}",
                                    *prepared, *overrides])
        torch.manual_seed(0)
        net = HybridModel(config.model, transformer_config(config.model))
        with torch.no_grad():  # norms away from 1, so that Qwen3-Next's (1 + w) storage matters
            for key, p in net.named_parameters():
                if "norm" in key:
                    p.add_(0.1 * torch.randn_like(p))
        shard = {k: v.detach().clone() for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
        out = pathlib.Path(tempfile.mkdtemp(dir=folder)) / name
        ckpt = Checkpoint(out.parent / "step_00000000", pathlib.Path(folder), config, 0, [shard])
        summary = export(ckpt, out, log=lambda *_: None)
        remote = summary["format"] == "LctrainForCausalLM"
        model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=remote, dtype=torch.float32).eval()
        sequence = torch.randint(4, 512, (2, 70), generator=torch.Generator().manual_seed(2))
        results[name] = {"format": summary["format"], "logit_difference": summary["max_logit_difference"],
                         "incremental_difference": _incremental_difference(model, sequence)}
    pathlib.Path(result_file).write_text(json.dumps(results))


def _zero(folder, result_file, *prepared) -> None:
    from lctrain.config import load_config
    from lctrain.hf.consolidate import load_checkpoint
    from lctrain.hf.export import convert
    from lctrain.train.loop import train

    results = {}
    for stage, precision in ((0, "bf16"), (1, "fp32")):
        run_dir = pathlib.Path(folder) / f"zero{stage}"
        train(load_config(None, [*TINY, *TRAIN, *prepared, "model.pattern=G-*-", f"run_dir={run_dir}", "train.steps=2",
                                 f"deepspeed.zero_stage={stage}", f"train.precision={precision}"]))
        summary = convert(run_dir, run_dir.parent / f"hf{stage}", log=lambda *_: None)
        step = load_checkpoint(run_dir).path
        module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        masters = load_checkpoint(run_dir).shards[0]
        results[f"{stage}-{precision}"] = {
            "logit_difference": summary["max_logit_difference"],
            "masters_differ_from_module": any(not torch.equal(masters[k], module[k].float()) for k in masters)}
    pathlib.Path(result_file).write_text(json.dumps(results))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"check": _check, "variants": _variants, "zero": _zero}[command](*arguments)
