"""Training metrics: TensorBoard scalars, the same records in <run_dir>/metrics.jsonl, and a progress bar (rank 0).

Scalars (tag: meaning): train/loss (mean next-token loss over the step's tokens), train/lr, train/grad_norm,
perf/tokens_per_s (all ranks' tokens / step time), perf/tflops (achieved model TFLOP/s per GPU, lctrain.train.flops),
perf/mfu (tflops / the GPU's dense bf16 peak), perf/step_time_s, perf/peak_memory_gib (GPU: peak allocated; CPU:
peak resident set of the process), eval/loss. A resumed run drops the records an interrupted attempt wrote past the
resume step, as TensorBoard's purge_step does for its events.
"""
from __future__ import annotations

import json
import os
import pathlib
import resource
import time

import torch


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


class MetricsLogger:
    """Writes only on rank 0; the other ranks get a logger that does nothing."""

    def __init__(self, run_dir: pathlib.Path, enabled: bool, tensorboard: bool, progress_bar: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.exists():  # a resumed run: forget what an interrupted attempt logged past the resume step
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.bar is not None and "train/loss" in scalars:
            postfix = {"loss": f"{scalars['train/loss']:.4f}"}
            if "perf/tokens_per_s" in scalars:
                postfix["tok/s"] = f"{scalars['perf/tokens_per_s']:.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
