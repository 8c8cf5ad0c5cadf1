"""The Ray Train side of a job: a ``TorchTrainer`` whose workers run ``lctrain.train.loop.train`` with the job's config.

Ray Train starts one worker per data/context/tensor-parallel rank, sets RANK/WORLD_SIZE/LOCAL_RANK and initialises
torch.distributed (nccl with GPUs, gloo without); ``init_parallel`` reuses that process group. DeepSpeed ZeRO,
context parallelism, TensorBoard and metrics.jsonl then work exactly as under the ``deepspeed`` launcher.

Checkpoints (Ray 2.60, Train v2). lctrain writes one folder per checkpoint step into ``<run_dir>/checkpoints`` on
shared storage: every rank's ZeRO shards plus each rank's data position and RNG state, renamed into place only when
complete. Every rank reports that same complete folder to Ray with ``CheckpointUploadMode.NO_UPLOAD``: the run
directory is Ray's experiment directory, so the folder is a Ray-managed checkpoint that needs no copy, and Ray merges
the ranks' reports into one checkpoint because their paths agree (it rejects reports whose paths differ). Reporting
a folder per rank instead would make Ray copy every shard into a merged folder: twice the storage, for a copy that
lctrain does not read.

Recovery. When a worker dies, Ray stops the whole worker group and starts a new one (``FailureConfig.max_failures``).
The new group resumes with ``checkpoint.resume=auto``, from lctrain's newest complete checkpoint, as soon as this job
has written one (``latest`` differs from what the job found when it started; until then the config's own
``checkpoint.resume`` applies again). The decision reads only the run directory, so every rank of a group makes the
same one, and it does not depend on Ray's record of reported checkpoints: a report still queued on a worker that
died never reaches Ray's controller (seen with Ray 2.60), so ``ray.train.get_checkpoint()`` can lag behind the
checkpoint on disk. The steps after the checkpoint are recomputed from the restored state (data position and RNG
included), so no step is applied twice, the TensorBoard writer drops the events after the resume step, and the run
ends at ``train.steps``.

Pruning. lctrain keeps ``checkpoint.keep_last`` checkpoints and Ray deletes none (``num_to_keep=None``), so they never
delete the same folder. Ray's record of the reported checkpoints (``checkpoint_manager_snapshot.json`` in the run
directory) may then name pruned folders, which Ray would refuse as a corrupted run directory in a later job on the same
run directory; each job therefore starts with that record removed. Continuing a run in a later job is lctrain's
``checkpoint.resume``, as with the other launchers.
"""
from __future__ import annotations

import dataclasses
import pathlib

from lctrain.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Workers of a job and what each one reserves on the cluster."""

    num_workers: int = 1
    gpus_per_worker: float = 1
    cpus_per_worker: float = 1
    max_failures: int = 3  # worker-group restarts before the job fails

    def check(self) -> None:
        from lctrain.config import ConfigError

        if self.num_workers < 1:
            raise ConfigError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0 and --cpus-per-worker > 0; got "
                              f"{self.gpus_per_worker} and {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.max_failures}")

    def args(self) -> list[str]:
        """The same scaling as command-line flags (for the job's entrypoint)."""
        return ["--num-workers", str(self.num_workers), "--gpus-per-worker", f"{self.gpus_per_worker:g}",
                "--cpus-per-worker", f"{self.cpus_per_worker:g}", "--max-failures", str(self.max_failures)]


def absolute_paths(config: RunConfig, base: pathlib.Path) -> RunConfig:
    """The config with its relative paths (run directory, tokenizer, dataset, resume folder) made absolute against
    ``base``: a job's working directory is a temporary copy of the code on each node, never where a run lives."""
    base = pathlib.Path(base).absolute()

    def absolute(path: str) -> str:
        return str(base / path) if path and not pathlib.Path(path).is_absolute() else path

    config = dataclasses.replace(config)
    config.run_dir = absolute(config.run_dir)
    config.tokenizer = dataclasses.replace(config.tokenizer, path=absolute(config.tokenizer.path))
    config.data = dataclasses.replace(config.data, dataset_dir=absolute(config.data.dataset_dir))
    if config.checkpoint.resume not in ("none", "auto"):
        config.checkpoint = dataclasses.replace(config.checkpoint, resume=absolute(config.checkpoint.resume))
    return config


class RayReports:
    """TrainHooks that report to Ray Train on every rank: each checkpoint, with the metrics of the latest logged step.

    Metrics go to Ray only with checkpoints: ``ray.train.report`` is a barrier of all workers whose result Ray's
    controller collects once per health check (2 s), so a report per logged step would throttle training to that
    pace; and Ray 2.60 keeps metrics only with checkpoints (``Result.metrics_dataframe``). Every logged step is in
    TensorBoard and metrics.jsonl as with any launcher.
    """

    def __init__(self):
        self.logged: dict = {}

    def on_log(self, step: int, scalars: dict) -> None:
        self.logged = {**scalars, "logged_step": step}

    def on_checkpoint(self, step: int, folder: pathlib.Path, scalars: dict) -> None:
        import ray.train

        ray.train.report({**self.logged, **scalars, "step": step},
                         checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def latest_checkpoint_state(run_dir: pathlib.Path) -> tuple | None:
    """Identity of the run's ``latest`` pointer (name, inode, mtime): each save replaces the file."""
    latest = pathlib.Path(run_dir) / "checkpoints" / "latest"
    try:
        stat = latest.stat()
        return latest.read_text().strip(), stat.st_ino, stat.st_mtime_ns
    except FileNotFoundError:
        return None


def train_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: lctrain's training function, reporting to Ray on every rank."""
    from lctrain.train.loop import TrainHooks, train

    config: RunConfig = loop_config["config"]
    if latest_checkpoint_state(pathlib.Path(config.run_dir)) != loop_config["checkpoint_at_job_start"]:
        config.checkpoint = dataclasses.replace(config.checkpoint, resume="auto")  # a restart after a checkpoint
    reports = RayReports()
    train(config, TrainHooks(on_log=reports.on_log, on_checkpoint=reports.on_checkpoint))


def fit(config: RunConfig, scaling: Scaling):
    """Train with a TorchTrainer on the connected cluster; returns Ray's Result (raises TrainingFailedError when the
    workers failed more than ``max_failures`` times). ``config.run_dir`` must be absolute and on shared storage."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    run_dir = pathlib.Path(config.run_dir)
    if not run_dir.is_absolute():
        raise ValueError(f"run_dir must be absolute for a Ray job, got {config.run_dir!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink(missing_ok=True)  # an earlier job's record (see above)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "checkpoint_at_job_start": latest_checkpoint_state(run_dir)},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                                failure_config=FailureConfig(max_failures=scaling.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    return trainer.fit()
