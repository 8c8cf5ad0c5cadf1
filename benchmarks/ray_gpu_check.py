"""Ray on a GPU machine, checked: the demo config as a Ray Train job on every GPU of a local head (token auth), then the
same run with one worker process killed mid-run (it must resume from the step-30 checkpoint and finish). Through
`lctrain submit` where this Ray has the job server, else the job's entrypoint run as a driver on the head. Every
command is bounded; the cluster is stopped at the end, also after a failure. Prints a table; exit status 1 if a check
failed.

    bash benchmarks/ray_gpu_check.sh            (sources .whl/install.sh; bounded to 5 minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

from lctrain.ray.demo import job_command, local_scaling, prepare
from lctrain.ray.local import LocalCluster, dashboard_available

CONFIG = "configs/demo.yaml"
FAULT_STEP, CHECKPOINT_STEP, STEPS = 35, 30, 60  # the demo config checkpoints every 30 of its 60 steps


def records(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def check(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def run_phase(cluster, name, run_dir, scaling, submit, env, out, timeout) -> tuple[int, str, float]:
    """Train the demo config on the cluster within ``timeout`` seconds; (exit status, log, wall seconds)."""
    cmd, cmd_env = job_command(cluster, str(pathlib.Path(CONFIG).absolute()), run_dir, [], scaling, timeout - 10, env,
                               submit)
    start = time.monotonic()
    try:
        result = cluster.run(cmd, timeout=timeout, env=cmd_env)
        code, log = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        code, log = 124, _text(e.stdout) + _text(e.stderr) + f"\n(killed after {timeout:.0f} s)"
    (out / f"{name}.log").write_text(log)
    print(f"== {name}: exit {code} in {time.monotonic() - start:.0f} s (log: {out / f'{name}.log'})", flush=True)
    print("\n".join(line for line in log.splitlines() if " step " in line or "lctrain:" in line or "resumed" in line)[-3000:])
    return code, log, time.monotonic() - start


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/ray_gpu_check"), help="logs of the runs")
    parser.add_argument("--work", default="/tmp/lctrain_ray_gpu", help="run directory and the cluster's files")
    parser.add_argument("--budget", type=float, default=270, help="seconds for everything (default %(default)s)")
    parser.add_argument("--mode", choices=["auto", "submit", "direct"], default="auto",
                        help="auto: lctrain submit where the job server's dependencies are installed, else direct")
    parser.add_argument("--isolated", action="store_true", help="cluster in a loopback-only namespace (root; for CPU trials)")
    parser.add_argument("--no-fault", action="store_true", help="only the plain run (it then gets all the time)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends SIGTERM: stop the cluster on the way out
    import torch

    deadline = time.monotonic() + args.budget
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    scaling = local_scaling(gpus)
    submit = dashboard_available() if args.mode == "auto" else args.mode == "submit"
    work = pathlib.Path(args.work).absolute()
    run_dir = work / "run"
    print(f"{gpus} x {torch.cuda.get_device_name(0) if gpus else 'no GPU'}; torch {torch.__version__}; "
          f"{'lctrain submit through the job server' if submit else 'the job entrypoint run as a driver on the head (no job server)'}",
          flush=True)
    failures: list[str] = []
    rows = []
    prepare(CONFIG, run_dir, [])
    print(f"tokenizer and data ready after {args.budget - (deadline - time.monotonic()):.0f} s", flush=True)
    with LocalCluster(work / "cluster", num_cpus=os.cpu_count(), num_gpus=gpus, dashboard=submit,
                      isolated_network=args.isolated) as cluster:
        # the first run also compiles the Triton kernels: it gets 60% of the time left, the second the rest
        code, log, seconds = run_phase(cluster, "plain", run_dir, scaling, submit, {}, out,
                                       (deadline - time.monotonic()) * (1 if args.no_fault else 0.6) - 5)
        recs = [r for r in records(run_dir) if "train/loss" in r]
        check("plain: exit 0", code == 0, f"exit {code}", failures)
        check("plain: all steps", bool(recs) and recs[-1]["step"] == STEPS, f"last logged step {recs[-1]['step'] if recs else None}", failures)
        latest = (run_dir / "checkpoints" / "latest")
        check("plain: final checkpoint", latest.is_file() and latest.read_text().strip() == f"step_{STEPS:08d}"
              and all((run_dir / "checkpoints" / f"step_{STEPS:08d}" / f"rank_{r}.pt").is_file() for r in range(scaling.num_workers)),
              latest.read_text().strip() if latest.is_file() else "no checkpoint", failures)
        check("plain: TensorBoard events", any((run_dir / "tensorboard").glob("events.*")), str(run_dir / "tensorboard"), failures)
        if recs:
            rows.append(("plain", scaling.num_workers, recs[0]["train/loss"], recs[-1]["train/loss"],
                         statistics.median(r["perf/tokens_per_s"] for r in recs[1:] or recs), seconds))
            check("plain: loss falls", recs[-1]["train/loss"] < recs[0]["train/loss"] - 0.5,
                  f"{recs[0]['train/loss']:.3f} -> {recs[-1]['train/loss']:.3f}", failures)
        plain = {r["step"]: r["train/loss"] for r in recs}

        if args.no_fault:
            return summary(rows, failures)
        prepare(CONFIG, run_dir, [])  # the same run from scratch, now with rank 1 dying after step 35
        fired = out / "fault_fired"
        fired.unlink(missing_ok=True)
        env = {"LCTRAIN_FAULT": f"after_step:{FAULT_STEP}:1", "LCTRAIN_FAULT_ONCE": str(fired)}
        code, log, seconds = run_phase(cluster, "killed_worker", run_dir, scaling, submit, env, out,
                                       deadline - time.monotonic() - 15)
        steps = [r["step"] for r in records(run_dir) if "train/loss" in r]
        recs = [r for r in records(run_dir) if "train/loss" in r]
        check("fault: exit 0", code == 0, f"exit {code}", failures)
        check("fault: worker died once", fired.is_file(), str(fired), failures)
        check("fault: resumed from the checkpoint",
              f"resumed from {run_dir / 'checkpoints' / f'step_{CHECKPOINT_STEP:08d}'} at step {CHECKPOINT_STEP}" in log,
              f"step {CHECKPOINT_STEP}", failures)
        restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
        check("fault: steps continue from the checkpoint", restart is not None and steps[restart] == CHECKPOINT_STEP + 1
              and steps[-1] == STEPS, f"logged steps {steps}", failures)
        if restart is not None:
            lost = {r["step"]: r["train/loss"] for r in recs[:restart]}
            again = {r["step"]: r["train/loss"] for r in recs[restart:]}
            if FAULT_STEP in lost and FAULT_STEP in again:  # rank 0 logged the fault step before the restart
                check("fault: recomputed step matches the lost attempt",
                      abs(again[FAULT_STEP] - lost[FAULT_STEP]) <= 0.01 * abs(lost[FAULT_STEP]),
                      f"step {FAULT_STEP}: {again[FAULT_STEP]:.4f} after the restart, {lost[FAULT_STEP]:.4f} before", failures)
            else:
                print(f"  (the lost attempt did not log step {FAULT_STEP}: no recomputed step to compare)")
            if FAULT_STEP in plain and FAULT_STEP in again:  # information: GPU kernels need not be bitwise deterministic
                print(f"  (step {FAULT_STEP} of the uninterrupted run: {plain[FAULT_STEP]:.4f})")
        if recs:
            rows.append(("killed_worker", scaling.num_workers, recs[0]["train/loss"], recs[-1]["train/loss"],
                         statistics.median(r["perf/tokens_per_s"] for r in recs[1:] or recs), seconds))
    return summary(rows, failures)


def summary(rows: list[tuple], failures: list[str]) -> int:
    print("\n| run | workers | first loss | last loss | median tok/s | wall s |\n|---|---|---|---|---|---|")
    for name, workers, first, last, tps, seconds in rows:
        print(f"| {name} | {workers} | {first:.3f} | {last:.3f} | {tps:.0f} | {seconds:.0f} |")
    print("ALL CHECKS PASSED" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
