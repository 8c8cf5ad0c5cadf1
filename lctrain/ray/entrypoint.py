"""The entrypoint of an lctrain Ray job: what ``lctrain submit`` runs on the cluster. It can also be run by hand on a
node of a running cluster (RAY_ADDRESS, or the local cluster):

    python -m lctrain.ray.entrypoint --config FILE [--set k=v ...] [--num-workers N --gpus-per-worker G
                                     --cpus-per-worker C --max-failures F] [--env KEY=VALUE ...]

Checks the config, its inputs (tokenizer, prepared data) and the cluster's resources before any worker starts: a
problem ends the job with one line and exit status 2, so the job fails at once instead of waiting for resources that
never come. Then trains with a TorchTrainer (lctrain.ray.trainer); exit status 1 when the workers failed more than
``--max-failures`` times. Relative paths in the config are taken relative to the current directory.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from lctrain.config import ConfigError, check_config, load_config
from lctrain.ray.trainer import Scaling, absolute_paths, fit


def scaling_args(parser: argparse.ArgumentParser) -> None:
    d = Scaling()
    parser.add_argument("--num-workers", type=int, default=d.num_workers, help="Ray Train workers = ranks (default %(default)s)")
    parser.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker,
                        help="GPUs each worker reserves; 0 trains on CPUs over gloo (default %(default)s)")
    parser.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs each worker reserves (default %(default)s)")
    parser.add_argument("--max-failures", type=int, default=d.max_failures,
                        help="worker-group restarts from the latest checkpoint before the job fails (default %(default)s)")


def scaling_from(args) -> Scaling:
    scaling = Scaling(args.num_workers, args.gpus_per_worker, args.cpus_per_worker, args.max_failures)
    scaling.check()
    return scaling


def key_value(flag: str, text: str) -> tuple[str, str]:
    if "=" not in text or not text.split("=", 1)[0]:
        raise ConfigError(f"{flag} expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def check_resources(scaling: Scaling) -> None:
    """Fail now if the cluster can never hold the workers (Ray would otherwise wait for them forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = scaling.num_workers * scaling.cpus_per_worker, scaling.num_workers * scaling.gpus_per_worker
    if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
        raise ConfigError(f"the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; "
                          f"{scaling.num_workers} workers x ({scaling.cpus_per_worker:g} CPUs, {scaling.gpus_per_worker:g} GPUs) "
                          f"need {cpus:g} CPUs and {gpus:g} GPUs: lower --num-workers / --cpus-per-worker / --gpus-per-worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lctrain.ray.entrypoint", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    scaling_args(parser)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable of every Ray Train worker (repeatable; a submitted job passes its "
                             "variables in its runtime_env instead)")
    args = parser.parse_args(argv)
    try:
        scaling = scaling_from(args)
        env = dict(key_value("--env", e) for e in args.env)
        config = absolute_paths(load_config(args.config, args.overrides), pathlib.Path.cwd())
        check_config(config, scaling.num_workers)
        from lctrain.config import check_prepared_inputs

        check_prepared_inputs(config)
        import ray

        ray.init(address="auto",  # the job's cluster (RAY_ADDRESS is set for a job), never a new local one
                 runtime_env={"env_vars": env} if env else None)
        check_resources(scaling)
    except ConfigError as e:
        print(f"lctrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"lctrain: training {config.run_dir} on {scaling.num_workers} Ray Train workers "
          f"({scaling.gpus_per_worker:g} GPUs, {scaling.cpus_per_worker:g} CPUs each; up to {scaling.max_failures} restarts)",
          flush=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # Ray Train would print each line of lctrain twice
    from ray.train import TrainingFailedError

    try:
        result = fit(config, scaling)
    except TrainingFailedError as e:
        print(f"lctrain: error: training failed: {' '.join(str(e).split())[:2000]}", file=sys.stderr, flush=True)
        return 1
    metrics = result.metrics or {}
    loss = metrics.get("train/loss")
    print(f"lctrain: finished at step {metrics.get('step')}"
          + (f", loss {loss:.4f}" if loss is not None else "")
          + f"; checkpoint {result.checkpoint.path if result.checkpoint else None}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
