"""``make ray-demo``: the demo config trained as a Ray job on a local single-node cluster, end to end.

    python -m lctrain.ray.demo [--config configs/demo.yaml] [--run-dir runs/ray-demo] [--set k=v ...] [--timeout S]

Prepares the tokenizer and token shards as ``lctrain demo`` does (kept between runs), starts a cluster on this machine
(token authentication; as root inside a private network namespace whose only interface is loopback, otherwise with
the job server on 127.0.0.1), submits the config with ``lctrain submit`` on every GPU (or 2 CPU workers over gloo),
prints how to open TensorBoard on the run, and stops the cluster, also when something fails. Where this Ray has no job
server (the dashboard's dependencies are missing, as in a stripped install), the job's entrypoint runs as a driver
on the head instead: the same TorchTrainer, without the job layer.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

from lctrain.config import load_config
from lctrain.ray.local import LocalCluster, dashboard_available, namespaces_available
from lctrain.ray.trainer import Scaling

def prepare(config: str, run_dir: pathlib.Path, overrides: list[str]) -> None:
    """Tokenizer and token shards of the run (made once, as ``lctrain demo`` does); earlier training output removed
    so that the demo starts from scratch."""
    common = ["--config", config, "--set", f"run_dir={run_dir}", *[a for o in overrides for a in ("--set", o)]]
    lctrain = [sys.executable, "-m", "lctrain.cli"]
    if not (run_dir / "tokenizer" / "tok.model").is_file():
        subprocess.run(lctrain + ["train-tokenizer", *common], check=True)
    if not (run_dir / "data" / "meta.json").is_file():
        subprocess.run(lctrain + ["prepare-data", *common], check=True)
    for previous in ("checkpoints", "tensorboard", "metrics.jsonl"):
        path = run_dir / previous
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def local_scaling(gpus: int) -> Scaling:
    """All GPUs of this machine, one worker each; without GPUs two CPU workers."""
    return Scaling(num_workers=gpus or 2, gpus_per_worker=1 if gpus else 0, cpus_per_worker=1, max_failures=2)


def job_command(cluster: LocalCluster, config: str, run_dir: pathlib.Path, overrides: list[str], scaling: Scaling,
                timeout: float, env: dict[str, str], submit: bool) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that trains the run on ``cluster``: ``lctrain submit`` through the job server, or the
    job's entrypoint run directly as a driver on the head (``submit=False``)."""
    sets = ["--set", f"run_dir={run_dir}", *[a for o in overrides for a in ("--set", o)]]
    if submit:
        cmd = [sys.executable, "-m", "lctrain.cli", "submit", "--address", cluster.address, "--token-file",
               str(cluster.token_file), "--config", config, *sets, *scaling.args(), "--timeout", f"{timeout:g}",
               *[a for k, v in env.items() for a in ("--env", f"{k}={v}")]]
        return cmd, {}
    cmd = [sys.executable, "-m", "lctrain.ray.entrypoint", "--config", config, *sets, *scaling.args(),
           *[a for k, v in env.items() for a in ("--env", f"{k}={v}")]]
    return cmd, {"RAY_ADDRESS": cluster.gcs_address, "PYTHONUNBUFFERED": "1"}


def report(run_dir: pathlib.Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    print("\n== Ray demo finished ==")
    print("train loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in losses))
    print(f"checkpoints:  {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text().strip()})")
    print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    print(f"TensorBoard:  .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}   (then open http://localhost:6006)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lctrain.ray.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--run-dir", default="runs/ray-demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the job is stopped (default %(default)s)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on `kill` too (the with-block exits)
    import torch

    config, run_dir = str(pathlib.Path(args.config).absolute()), pathlib.Path(args.run_dir).absolute()
    load_config(config, [f"run_dir={run_dir}", *args.overrides])  # a bad config stops here, before any work
    prepare(config, run_dir, args.overrides)
    gpus = torch.cuda.device_count()
    scaling = local_scaling(gpus)
    submit, isolated = dashboard_available(), namespaces_available()
    print(f"starting a local Ray cluster (token auth, {'private loopback-only network' if isolated else 'job server on 127.0.0.1'}); "
          f"{scaling.num_workers} workers on {'GPUs' if gpus else 'CPUs'}; "
          f"{'lctrain submit' if submit else 'no job server in this Ray: the entrypoint runs as a driver'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lctrain-ray-") as workdir:
        with LocalCluster(pathlib.Path(workdir), num_cpus=max(os.cpu_count() or 1, scaling.num_workers), num_gpus=gpus,
                          dashboard=submit, isolated_network=isolated) as cluster:
            cmd, env = job_command(cluster, config, run_dir, args.overrides, scaling, args.timeout, {}, submit)
            print("running:", " ".join(cmd), flush=True)
            code = cluster.run(cmd, timeout=args.timeout + 120, env=env, capture=False).returncode
    print("the local Ray cluster is stopped", flush=True)
    if code == 0:
        report(run_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
