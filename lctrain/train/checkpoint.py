"""Checkpoints: DeepSpeed engine state (ZeRO shards of every rank) plus lctrain's own per-rank state, written
atomically and pruned to the last k.

Layout under <run_dir>/checkpoints/:
    step_00000050/            a complete checkpoint: DeepSpeed's files, rank_<r>.pt (data position, RNG states)
    latest                    the name of the newest complete checkpoint (replaced atomically)
    .step_00000060.partial/   only while a save is under way, or left by a crash: never read

A save writes into the ``.partial`` folder, waits for every rank, renames it (atomic on one filesystem) and then
replaces ``latest``. A crash at any point leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import os
import pathlib
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_checkpoint(root: pathlib.Path) -> pathlib.Path | None:
    """The newest complete checkpoint under root (the one ``latest`` names), or None."""
    latest = root / "latest"
    if latest.is_file():
        path = root / latest.read_text().strip()
        if path.is_dir():
            return path
    complete = sorted(p for p in root.glob("step_*") if STEP_DIR.match(p.name) and p.is_dir()) if root.is_dir() else []
    return complete[-1] if complete else None


class CheckpointManager:
    def __init__(self, root: pathlib.Path, keep_last: int, rank: int):
        self.root, self.keep_last, self.rank = pathlib.Path(root), keep_last, rank

    def save(self, engine, step: int, shared_state: dict, rank_state: dict) -> pathlib.Path:
        """Save after ``step`` optimizer steps. ``shared_state`` goes into DeepSpeed's client state (same on all
        ranks); ``rank_state`` is this rank's own (data position, RNG)."""
        name = step_name(step)
        partial, final = self.root / f".{name}.partial", self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state=shared_state, save_latest=False)
        torch.save(rank_state, partial / f"rank_{dist.get_rank()}.pt")
        from lctrain.train.faults import maybe_fail

        maybe_fail("during_save", step)
        dist.barrier()
        if self.rank == 0:
            if final.exists():  # a checkpoint of this step from an earlier, resumed run: replace it whole
                shutil.rmtree(final)
            os.replace(partial, final)
            write_text_atomic(self.root / "latest", name)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if STEP_DIR.match(p.name))
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, path: pathlib.Path) -> tuple[dict, dict]:
        """Restore the engine from ``path``; return (shared client state, this rank's own state)."""
        path = pathlib.Path(path)
        rank_file = path / f"rank_{dist.get_rank()}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {rank_file.name}: it was written by a different number "
                                    f"of ranks or is incomplete")
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
        return client_state, torch.load(rank_file, weights_only=False)
