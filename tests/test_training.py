"""End-to-end training on CPU: 2 processes over gloo, DeepSpeed ZeRO 1, 2 and 3; exact resume; a crash during a
checkpoint save; TensorBoard events read back. Each run is a real `torchrun launch/train.py` process group."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

BASE = [
    "model.hidden_size=64", "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_k_dim=16",
    "model.gated_deltanet.head_v_dim=16", "model.attention.num_heads=2", "model.attention.window=32",
    "tokenizer.vocab_size=512", "data.seq_len=128", "data.micro_batch_size=2", "train.lr=3e-3", "train.warmup_steps=2",
    "train.eval_interval=4", "train.eval_steps=1", "logging.log_interval=1", "logging.progress_bar=false",
    "train.loss_chunk_tokens=100",
]
PATTERN = "model.pattern=G-W-*-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lctrain(*args, env=None, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "lctrain.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"lctrain {args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def torchrun(run_dir, *overrides, env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "launch" / "train.py"), "--set", f"run_dir={run_dir}", *sum((["--set", o] for o in BASE + [PATTERN]), []),
           *sum((["--set", o] for o in overrides), [])]
    # The model's torch paths run here (kernels are tested on their own), not the Triton interpreter.
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**base, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tokenizer and token shards from a slice of the standard library, shared by the runs below."""
    from lctrain.data.corpus import default_corpus_files

    root = tmp_path_factory.mktemp("prepared")
    inputs = "[" + ", ".join(str(p) for p in default_corpus_files()[:60]) + "]"
    common = ["--set", f"run_dir={root}", "--set", "tokenizer.vocab_size=512", "--set", f"data.inputs={inputs}",
              "--set", "data.eval_fraction=0.1"]
    lctrain("train-tokenizer", *common)
    lctrain("prepare-data", *common)
    return [f"tokenizer.path={root / 'tokenizer' / 'tok.model'}", f"data.dataset_dir={root / 'data'}"]


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_logs(tmp_path, prepared, stage):
    run = tmp_path / "run"
    torchrun(run, *prepared, f"deepspeed.zero_stage={stage}", "train.steps=8", "checkpoint.interval=0")
    curve = losses(run)
    assert sorted(curve) == list(range(1, 9))
    assert curve[8] < curve[1] - 0.3, curve
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert (run / "config.yaml").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "perf/step_time_s",
                "perf/peak_memory_gib", "eval/loss"]:
        assert tag in tags, (tag, tags)
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged.keys() == curve.keys()
    assert all(abs(logged[s] - curve[s]) < 1e-5 for s in curve)  # TensorBoard keeps float32
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]
    assert all(e.value > 0 for e in events.Scalars("perf/tokens_per_s"))


def test_zero2_resume_is_exact_and_a_crash_during_save_keeps_the_last_checkpoint(tmp_path, prepared):
    steps = ["train.steps=8", "checkpoint.interval=3", "deepspeed.zero_stage=2"]
    whole = tmp_path / "whole"
    torchrun(whole, *prepared, *steps)
    reference = losses(whole)

    broken = tmp_path / "broken"
    crash = torchrun(broken, *prepared, *steps, env={"LCTRAIN_FAULT": "during_save:6"}, check=False)
    assert crash.returncode != 0
    ckpt = broken / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    assert (ckpt / ".step_00000006.partial").is_dir()  # the interrupted save, never read
    assert not (ckpt / "step_00000006").exists()
    before_crash = losses(broken)
    assert max(before_crash) == 6

    torchrun(broken, *prepared, *steps, "checkpoint.resume=auto")
    steps_logged = [json.loads(line)["step"] for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps_logged if s <= 8] == sorted(set(steps_logged)), "records past the resume step were kept"
    resumed = losses(broken)
    # steps 1-6 from the first attempt, then 4-8 again from the step-3 checkpoint: identical to the whole run
    assert {s: v for s, v in resumed.items() if s <= 3} == {s: reference[s] for s in range(1, 4)}
    for step in range(4, 9):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert (ckpt / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000006", "step_00000008"]  # keep_last=2
