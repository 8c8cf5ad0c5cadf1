"""Ray cluster jobs on CPU. End to end (slow): a real single-node Ray cluster (token authentication) in a private
network namespace whose only interface is loopback, `lctrain submit` of a 2-worker gloo ZeRO-2 run, a worker process
killed mid-run and the recovery from the last checkpoint, bad configs (rejected locally; failing on the cluster), a
timeout, and the token being required. One cluster serves all of them and is stopped at the end, also after a
failure. Fast: where the token is looked up, what a job uploads, how paths are resolved."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_cluster = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                   reason="the loopback-only cluster needs root and unshare (Linux namespaces)")

TINY = [
    "model.pattern=G-W-", "model.hidden_size=64", "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_k_dim=16",
    "model.gated_deltanet.head_v_dim=16", "model.attention.num_heads=2", "model.attention.window=32",
    "tokenizer.vocab_size=512", "data.seq_len=128", "data.micro_batch_size=2", "train.lr=3e-3", "train.warmup_steps=2",
    "train.eval_interval=4", "train.eval_steps=1", "train.loss_chunk_tokens=100", "logging.log_interval=1",
    "logging.progress_bar=false", "deepspeed.zero_stage=2",
]
JOB_TIMEOUT = 240  # seconds: --timeout of each submission (the job is stopped past it)


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tokenizer and token shards from a slice of the standard library."""
    from lctrain.data.corpus import default_corpus_files

    root = tmp_path_factory.mktemp("prepared")
    inputs = "[" + ", ".join(str(p) for p in default_corpus_files()[:30]) + "]"
    common = sets(f"run_dir={root}", "tokenizer.vocab_size=512", f"data.inputs={inputs}", "data.eval_fraction=0.1")
    for command in ("train-tokenizer", "prepare-data"):
        subprocess.run([sys.executable, "-m", "lctrain.cli", command, *common], check=True, capture_output=True,
                       timeout=300, cwd=ROOT)
    return [f"tokenizer.path={root / 'tokenizer' / 'tok.model'}", f"data.dataset_dir={root / 'data'}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from lctrain.ray.local import LocalCluster

    # Workers run the kernels' torch path (the Triton interpreter that the kernel tests use would only slow them
    # down) and one thread each, as on a 2-core machine.
    local = LocalCluster(tmp_path_factory.mktemp("ray"), num_cpus=4, isolated_network=True,
                         env={"OMP_NUM_THREADS": "1"})
    local.env.pop("TRITON_INTERPRET", None)
    with local:
        yield local


def lctrain(cluster, *args: str, timeout: float = JOB_TIMEOUT + 60, token: bool = True) -> subprocess.CompletedProcess:
    """An lctrain command inside the cluster's network namespace, pointed at its job server (and token)."""
    auth = ["--token-file", str(cluster.token_file)] if token else []
    return cluster.run([sys.executable, "-m", "lctrain.cli", *args, "--address", cluster.address, *auth],
                       timeout=timeout, cwd=ROOT)


def job_id_of(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("submitted Ray job ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return lines[0].split()[-1]


def submitted_jobs(cluster) -> list[str]:
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "c = JobSubmissionClient(sys.argv[1], headers={'Authorization': 'Bearer ' + open(sys.argv[2]).read()}); "
            "print(' '.join(sorted(j.submission_id for j in c.list_jobs())))")
    result = cluster.run([sys.executable, "-c", code, cluster.address, str(cluster.token_file)], timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.slow
@needs_cluster
def test_job_trains_and_recovers_from_a_killed_worker(cluster, prepared, tmp_path):
    """Rank 1's process dies right after step 5 (the lctrain fault point: os._exit in the Ray Train worker). Ray
    restarts the worker group, which resumes from the step-3 checkpoint and finishes all 8 steps."""
    run, fired = tmp_path / "run", tmp_path / "fault_fired"
    result = lctrain(cluster, "submit", *sets(*TINY, *prepared, f"run_dir={run}", "train.steps=8", "checkpoint.interval=3"),
                     "--num-workers", "2", "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--max-failures", "2",
                     "--env", "LCTRAIN_FAULT=after_step:5:1", "--env", f"LCTRAIN_FAULT_ONCE={fired}",
                     "--timeout", str(JOB_TIMEOUT))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    job_id = job_id_of(result)
    assert f"job {job_id}: SUCCEEDED" in result.stdout
    assert fired.read_text() == "after_step:5:1"  # the worker really died once
    assert "[FailurePolicy] RETRY" in output  # Ray's controller saw the failure and restarted the group
    assert f"resumed from {run / 'checkpoints' / 'step_00000003'} at step 3" in output
    assert "lctrain: finished at step 8" in output

    # metrics.jsonl: the restarted group resumed at step 3 and dropped what the first attempt logged past it (steps
    # 4-5), so each step appears once, from 1 to the configured 8. (That a resumed step recomputes exactly the same
    # loss is checked in test_training.py's ZeRO-2 resume test.)
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9)), records
    assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [e.step for e in events.Scalars("train/loss")]
    assert logged == list(range(1, 9)), logged  # the writer purged the first attempt's events after step 3
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]
    assert {"perf/tokens_per_s", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])

    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"
    assert {"rank_0.pt", "rank_1.pt"} <= {p.name for p in (checkpoints / "step_00000008").iterdir()}
    # Ray registered lctrain's shared checkpoint folder itself (reported by both ranks, not copied)
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    reported = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    assert reported[-1] == "checkpoints/step_00000008", reported
    assert not [p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]  # no Ray-made copies

    status = lctrain(cluster, "jobs", "status", job_id, timeout=60)
    assert status.returncode == 0 and status.stdout.strip().startswith(f"{job_id}: SUCCEEDED"), status.stdout + status.stderr
    logs = lctrain(cluster, "jobs", "logs", job_id, timeout=60)
    assert "lctrain: finished at step 8" in logs.stdout


@pytest.mark.slow
@needs_cluster
def test_bad_config_is_rejected_locally_and_nothing_is_submitted(cluster, prepared):
    before = submitted_jobs(cluster)
    result = lctrain(cluster, "submit", *sets(*TINY, *prepared, "model.pattern=G-Q-"), "--gpus-per-worker", "0", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "model.pattern has unknown symbol 'Q'" in result.stderr
    result = lctrain(cluster, "submit", *sets(*TINY, *prepared, "parallel.context_parallel_size=2"),
                     "--num-workers", "3", "--gpus-per-worker", "0", timeout=120)
    assert result.returncode == 2 and "world size 3 must be divisible" in result.stderr, result.stderr
    assert submitted_jobs(cluster) == before


@pytest.mark.slow
@needs_cluster
def test_config_that_fails_on_the_cluster_fails_the_job_with_its_error(cluster, prepared, tmp_path):
    """Valid YAML and keys, but its dataset does not exist where the job runs: the job fails at once, no hang."""
    missing = tmp_path / "no_such_dataset"
    result = lctrain(cluster, "submit", *sets(*TINY, *prepared, f"run_dir={tmp_path / 'run'}", f"data.dataset_dir={missing}"),
                     "--num-workers", "2", "--gpus-per-worker", "0", "--timeout", "120", timeout=180)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"lctrain: error: no prepared dataset in '{missing}'" in result.stdout + result.stderr
    job_id = job_id_of(result)
    assert f"job {job_id}: FAILED" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@needs_cluster
def test_timeout_stops_the_job(cluster, prepared, tmp_path):
    result = lctrain(cluster, "submit", *sets(*TINY, *prepared, f"run_dir={tmp_path / 'run'}", "train.steps=1000"),
                     "--num-workers", "2", "--gpus-per-worker", "0", "--timeout", "3", timeout=120)
    assert result.returncode == 124, result.stdout[-3000:] + result.stderr[-3000:]
    assert "did not finish within --timeout 3 s; it was stopped" in result.stderr
    status = lctrain(cluster, "jobs", "status", job_id_of(result), timeout=60)
    assert status.stdout.startswith(f"{job_id_of(result)}: STOPPED"), status.stdout + status.stderr


@pytest.mark.slow
@needs_cluster
def test_the_job_server_requires_the_token(cluster, tmp_path):
    unauthenticated = cluster.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{cluster.address}/api/jobs/"],
                                  timeout=30)
    assert unauthenticated.stdout == "401"
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    result = cluster.run([sys.executable, "-m", "lctrain.cli", "jobs", "status", "raysubmit_none", "--address",
                          cluster.address, "--token-file", str(wrong)], timeout=60, cwd=ROOT)
    assert result.returncode == 1 and "Authentication failed" in result.stderr, result.stderr
    missing = cluster.run([sys.executable, "-m", "lctrain.cli", "jobs", "status", "raysubmit_none", "--address",
                           cluster.address], timeout=60, cwd=ROOT,
                          env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": "", "RAY_AUTH_MODE": ""})
    assert missing.returncode == 2 and "no Ray auth token" in missing.stderr, missing.stderr


def test_token_lookup_order(tmp_path, monkeypatch):
    from lctrain.config import ConfigError
    from lctrain.ray.jobs import read_token

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no Ray auth token"):
        read_token(None)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert read_token(None) == "home"
    (tmp_path / "named").write_text("named")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "named"))
    assert read_token(None) == "named"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    (tmp_path / "flag").write_text("flag")
    assert read_token(str(tmp_path / "flag")) == "flag"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # Ray's explicit opt-out; a --token-file still wins
    assert read_token(None) is None and read_token(str(tmp_path / "flag")) == "flag"
    with pytest.raises(ConfigError, match="--token-file"):
        read_token(str(tmp_path / "missing"))


def test_job_working_dir_is_the_package_as_installed(tmp_path):
    """The upload holds lctrain with kernels/ and parallel/ inside it (as setup.py installs them) and the resolved
    config, and Python started there imports lctrain's subpackages from it."""
    from lctrain.config import load_config
    from lctrain.ray.jobs import stage_working_dir

    config = load_config(None, [f"run_dir={tmp_path / 'run'}", "train.steps=7"])
    stage = stage_working_dir(config, tmp_path / "stage")
    assert sorted(p.name for p in stage.iterdir()) == ["lctrain", "run_config.yaml"]
    for module in ("lctrain/ray/entrypoint.py", "lctrain/kernels/common.py", "lctrain/parallel/groups.py",
                   "lctrain/train/loop.py"):
        assert (stage / module).is_file(), module
    assert not list(stage.rglob("__pycache__"))
    assert load_config(stage / "run_config.yaml") == config
    code = "import importlib.util as u; print(u.find_spec('lctrain.kernels').origin, u.find_spec('lctrain.parallel').origin)"
    found = subprocess.run([sys.executable, "-c", code], cwd=stage, capture_output=True, text=True, check=True, timeout=60)
    assert all(pathlib.Path(p).is_relative_to(stage) for p in found.stdout.split()), found.stdout


def test_relative_paths_resolve_against_the_storage():
    from lctrain.config import load_config
    from lctrain.ray.trainer import absolute_paths

    config = load_config(None, ["run_dir=runs/x", "tokenizer.path=tok/t.model", "data.dataset_dir=/abs/data"])
    resolved = absolute_paths(config, pathlib.Path("/shared"))
    assert (resolved.run_dir, resolved.tokenizer.path, resolved.data.dataset_dir) == ("/shared/runs/x", "/shared/tok/t.model", "/abs/data")
    assert config.run_dir == "runs/x"  # the original is left as it was
