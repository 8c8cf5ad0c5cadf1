"""The ``lctrain`` command: train, prepare-data, train-tokenizer, demo (and the launchers' subcommands).

Every subcommand takes ``--config FILE`` and repeatable ``--set dotted.key=value``. Bad input ends the command with
one line on stderr naming the problem and what is allowed, exit status 2, and nothing written.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys

from lctrain.config import ConfigError, RunConfig, load_config


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply to what it leaves out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=1e-3 (repeatable)")


def _load(args) -> RunConfig:
    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from lctrain.train.loop import train

    if args.resume:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    config = _load(args)
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {summary['steps']}: loss {summary['loss']:.4f}; checkpoint {summary['checkpoint']}")
    return 0


def cmd_train_tokenizer(args) -> int:
    from lctrain.data.corpus import default_corpus_files
    from lctrain.data.tokenizer import train_tokenizer

    config = _load(args)
    out = config.tokenizer_path
    if out.suffix != ".model":
        raise ConfigError(f"tokenizer.path must end in .model, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"tokenizer {str(out)!r} exists; pass --overwrite to replace it")
    files = [pathlib.Path(p) for p in config.data.inputs] or default_corpus_files()
    for f in files:
        if not f.is_file():
            raise ConfigError(f"data.inputs: {str(f)!r} is not a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    train_tokenizer(files, out.with_suffix(""), config.tokenizer.vocab_size, model_type=config.tokenizer.model_type,
                    input_sentence_size=config.tokenizer.training_sentences)
    print(f"tokenizer written to {out} ({config.tokenizer.vocab_size} pieces, {config.tokenizer.model_type})")
    return 0


def cmd_prepare_data(args) -> int:
    from lctrain.data.shards import prepare_data
    from lctrain.data.tokenizer import Tokenizer

    config = _load(args)
    if not config.tokenizer_path.is_file():
        raise ConfigError(f"tokenizer {str(config.tokenizer_path)!r} does not exist; run `lctrain train-tokenizer` first")
    inputs = [pathlib.Path(p) for p in config.data.inputs] or None
    for f in inputs or []:
        if not f.is_file():
            raise ConfigError(f"data.inputs: {str(f)!r} is not a file")
    meta = prepare_data(inputs, Tokenizer(config.tokenizer_path), config.dataset_dir,
                        eval_fraction=config.data.eval_fraction, overwrite=args.overwrite)
    print(f"dataset written to {config.dataset_dir}: {meta}")
    return 0


def cmd_demo(args) -> int:
    """Tokenizer and data (kept between demo runs), then the launcher's 2-process (or all-GPU) ZeRO training."""
    import torch

    config = _load(args)
    run_dir = pathlib.Path(args.run_dir or config.run_dir)
    common = ["--config", args.config, "--set", f"run_dir={run_dir}", *sum((["--set", o] for o in args.overrides), [])]
    lctrain = [sys.executable, "-m", "lctrain.cli"]
    if not (run_dir / "tokenizer" / "tok.model").is_file():
        subprocess.run(lctrain + ["train-tokenizer", *common], check=True)
    if not (run_dir / "data" / "meta.json").is_file():
        subprocess.run(lctrain + ["prepare-data", *common], check=True)
    for previous in ("checkpoints", "tensorboard", "metrics.jsonl"):  # a demo run starts from scratch
        path = run_dir / previous
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    gpus = torch.cuda.device_count()
    launcher = shutil.which("deepspeed") or str(pathlib.Path(sys.executable).parent / "deepspeed")
    root = pathlib.Path(__file__).resolve().parent.parent
    cmd = [launcher, "--num_gpus", str(gpus or 2), str(root / "launch" / "train.py"), *common]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _demo_report(run_dir)
    return 0


def cmd_convert_hf(args) -> int:
    from lctrain.hf.consolidate import ConversionError
    from lctrain.hf.export import convert
    from lctrain.hf.weights import parse_size

    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    convert(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify,
            max_shard_bytes=max_shard)
    return 0


def cmd_import_hf(args) -> int:
    from lctrain.hf.importer import import_model

    import_model(args.model, _load(args), args.out, overwrite=args.overwrite)
    return 0


def _demo_report(run_dir: pathlib.Path) -> None:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    print("\n== demo finished ==")
    print("train loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in losses))
    if evals:
        print("eval loss by step:  " + ", ".join(f"{s}: {v:.3f}" for s, v in evals))
    print(f"checkpoints:  {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text().strip()})")
    print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    print(f"TensorBoard:  .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}   (then open http://localhost:6006)")


def cmd_submit(args) -> int:
    """Ray job: check the config here, submit it, follow its logs (lctrain.ray.jobs)."""
    from lctrain.ray import jobs
    from lctrain.ray.entrypoint import key_value, scaling_from

    if args.no_wait and args.timeout:
        raise ConfigError("--timeout bounds following the job; it cannot be combined with --no-wait")
    env = dict(key_value("--env", e) for e in args.env)
    scaling = scaling_from(args)
    config = _load(args)
    job_id = None
    try:
        client = jobs.connect(args.address, args.token_file)
        job_id = jobs.submit(client, config, scaling, pathlib.Path(args.storage), env, args.job_id)
        print(f"submitted Ray job {job_id}", flush=True)
        if args.no_wait:
            print(f"follow it with: lctrain jobs logs {job_id} --follow --address {client.get_address()}")
            return 0
        state = jobs.follow(client, job_id, args.timeout)
        message = jobs.status(client, job_id)[1] if state != "SUCCEEDED" else ""
    except KeyboardInterrupt:
        if job_id:
            print(f"\nstopped following; the job keeps running (lctrain jobs stop {job_id})", file=sys.stderr)
        return 130
    except jobs.ClusterError as e:
        print(f"lctrain: error: {e}", file=sys.stderr)
        return 1
    if state == "TIMEOUT":
        print(f"lctrain: error: job {job_id} did not finish within --timeout {args.timeout:g} s; it was stopped", file=sys.stderr)
        return 124
    print(f"job {job_id}: {state}" + (f": {' '.join(message.split())[:1000]}" if message else ""),
          file=sys.stdout if state == "SUCCEEDED" else sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from lctrain.ray import jobs

    try:
        client = jobs.connect(args.address, args.token_file)
        if args.action == "status":
            state, message = jobs.status(client, args.job_id)
            print(f"{args.job_id}: {state}" + (f": {' '.join(message.split())}" if message else ""))
        elif args.action == "logs" and args.follow:
            state = jobs.follow(client, args.job_id, None)
            print(f"{args.job_id}: {state}")
            return 0 if state == "SUCCEEDED" else 1
        elif args.action == "logs":
            sys.stdout.write(jobs.logs(client, args.job_id))
        else:
            print(f"{args.job_id}: {jobs.stop(client, args.job_id)}")
    except jobs.ClusterError as e:
        print(f"lctrain: error: {e}", file=sys.stderr)
        return 1
    return 0


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--token-file", help="file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                        "the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lctrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (run under deepspeed/torchrun for several processes)")
    _config_args(p)
    p.add_argument("--resume", help="'auto' (latest checkpoint of the run), 'none', or a checkpoint directory")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-tokenizer", help="train the sentencepiece tokenizer on data.inputs (or the embedded corpus)")
    _config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare-data", help="tokenize data.inputs (or the embedded corpus) into token shards")
    _config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("demo", help="tokenizer, data and a short multi-process training run, end to end")
    _config_args(p)
    p.add_argument("--run-dir", help="where the demo writes (default: the config's run_dir)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert-hf", help="export a checkpoint as a Hugging Face model folder (checked against lctrain)")
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or checkpoints/step_N")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (must be empty or absent)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16 for the written weights")
    p.add_argument("--max-shard-size", default="5GB", help="larger weights are split into shards with an index")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the exported model's logits with lctrain's (default on; fails above 1e-4)")
    p.set_defaults(func=cmd_convert_hf)

    p = sub.add_parser("import-hf", help="a Hugging Face folder as a run directory that trains from its weights")
    _config_args(p)
    p.add_argument("--model", required=True, help="an exported (or native Qwen3-Next / Mamba2) Hugging Face folder")
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("submit", help="submit a training run to a Ray cluster as a job (Ray Train workers, same training)")
    _config_args(p)
    _cluster_args(p)
    from lctrain.ray.entrypoint import scaling_args

    scaling_args(p)
    p.add_argument("--storage", default=".", help="shared folder every node sees; relative paths of the config "
                   "(run_dir, tokenizer, data) are taken relative to it (default: the current directory)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job (repeatable)")
    p.add_argument("--job-id", help="the job's submission id (default: chosen by Ray)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following its logs")
    p.add_argument("--timeout", type=float, help="stop the job if it has not finished after this many seconds (exit 124)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="status, logs or stop of a Ray job submitted with `lctrain submit`")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    _cluster_args(p)
    p.add_argument("--follow", action="store_true", help="logs: follow them until the job ends (exit 1 unless it succeeded)")
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"lctrain: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"lctrain: error: step failed with exit status {e.returncode}: {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return e.returncode or 1


if __name__ == "__main__":
    sys.exit(main())
