"""The training function every launcher calls (deepspeed, torchrun, Ray workers): ``train(config)``.

One optimizer step = ``grad_accum_steps`` micro-batches per data-parallel rank. The loss of a step is the mean
next-token loss over all labelled tokens of the step's sequences on all ranks:

    loss = sum over ranks and micro-batches of loss_sum / N_step,   N_step = labelled tokens in the step (all ranks)

DeepSpeed divides the loss by grad_accum_steps in backward and averages gradients over its data-parallel group
(data x context parallel ranks, see lctrain.parallel.mpu), so each micro-batch backpropagates
loss_sum * (dp x cp x grad_accum_steps) / N_step and the result is exactly the gradient of the mean above.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lctrain.config import ConfigError, RunConfig, check_config, check_prepared_inputs, dump_config
from lctrain.model.hybrid import HybridModel, transformer_config
from lctrain.model.layout import layout_from_cu_seqlens
from lctrain.parallel.groups import init_parallel
from lctrain.parallel.mpu import DeepSpeedMPU
from lctrain.train import flops
from lctrain.train.checkpoint import CheckpointManager, find_checkpoint, rng_state, set_rng_state, write_text_atomic
from lctrain.train.faults import maybe_fail
from lctrain.train.metrics import MetricsLogger, peak_memory_gib
from lctrain.train.schedule import warmup_cosine
from lctrain.train.zero_step import fuse_gradient_checks


@dataclasses.dataclass
class TrainHooks:
    """Callbacks for launchers that report elsewhere (Ray Train). Called on every rank."""

    on_log: Callable[[int, dict], None] | None = None
    on_checkpoint: Callable[[int, pathlib.Path, dict], None] | None = None


def deepspeed_config(config: RunConfig, bf16: bool) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": config.data.micro_batch_size,
        "gradient_accumulation_steps": config.train.grad_accum_steps,
        "gradient_clipping": config.train.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.deepspeed.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    _merge(ds, config.deepspeed.extra)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on the matmul weights only (not on norms, convolutions, decay rates or steps)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "conv" not in name else no_decay).append(param)
    t = config.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=device.type == "cuda")


def model_inputs(batch, device: torch.device):
    """(input_ids, labels, layout) of this rank's share of a micro-batch: the whole batch, or under context
    parallelism this rank's slice of every row."""
    if parallel_state.get_context_parallel_world_size() > 1:
        from lctrain.parallel.sharding import shard_for_context

        return shard_for_context(batch, device)
    rows, row_len = batch.input_ids.shape
    layout = layout_from_cu_seqlens(batch.cu_seqlens, rows, row_len).to(device)
    return batch.input_ids.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True), layout


def _sum(value: torch.Tensor, group) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value


def evaluate(engine, loader_factory, config: RunConfig, device) -> float:
    """Mean loss over the first ``eval_steps`` micro-batches of the eval split (the same ones every time)."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for _, batch in zip(range(config.train.eval_steps), loader_factory()):
            ids, labels, layout = model_inputs(batch, device)
            s, n = engine(ids, layout, labels, config.train.loss_chunk_tokens)
            loss_sum += s.double()
            tokens += n.double()
    engine.train()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return (_sum(loss_sum, group) / _sum(tokens, group).clamp(min=1)).item()


def train(config: RunConfig, hooks: TrainHooks | None = None) -> dict:
    """Train as configured; returns a summary (steps, last loss, run directory, last checkpoint)."""
    import deepspeed

    from lctrain.data.loader import PackedLoader
    from lctrain.data.shards import open_dataset
    from lctrain.data.tokenizer import Tokenizer

    hooks = hooks or TrainHooks()
    check_prepared_inputs(config)
    par = init_parallel(config.parallel.tensor_parallel_size, config.parallel.context_parallel_size, config.train.seed)
    check_config(config, par.world_size)
    device, rank0 = par.device, par.rank == 0
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
    run_dir = pathlib.Path(config.run_dir)

    tokenizer = Tokenizer(config.tokenizer_path)
    train_data = open_dataset(config.dataset_dir, "train")
    eval_data = open_dataset(config.dataset_dir, "eval") if config.train.eval_interval else None
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; use 0 (the tokenizer's) or a larger size")

    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_config(config))
    torch.manual_seed(config.train.seed)
    model = HybridModel(config.model, transformer_config(config.model, par.tensor_parallel_size, par.context_parallel_size))
    model.set_checkpointing(config.train)
    if config.checkpoint.init_from:  # weights from `lctrain import-hf`; a checkpoint resumed below replaces them
        from lctrain.hf.weights import load_full_state

        load_full_state(model, config.checkpoint.init_from)
    model.to(device)
    optimizer = build_optimizer(model, config, device)
    t = config.train
    scheduler = warmup_cosine(optimizer, t.lr, t.min_lr, t.warmup_steps, t.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, bf16), mpu=DeepSpeedMPU(),
                                           dist_init_required=False)
    fuse_gradient_checks(engine.optimizer)  # one multi-tensor pass each for the overflow check and norm

    d = config.data
    loader = PackedLoader(train_data, d.seq_len, d.micro_batch_size, par.data_parallel_rank, par.data_parallel_size, d.seed)
    eval_loader = lambda: iter(PackedLoader(eval_data, d.seq_len, d.micro_batch_size, par.data_parallel_rank,  # noqa: E731
                                            par.data_parallel_size, d.seed, shuffle=False))
    checkpoints = CheckpointManager(run_dir / "checkpoints", config.checkpoint.keep_last, par.rank)

    start_step = 0
    resume = config.checkpoint.resume
    source = find_checkpoint(run_dir / "checkpoints") if resume == "auto" else None if resume == "none" else pathlib.Path(resume)
    if source is not None:
        shared, own = checkpoints.load(engine, source)
        start_step = int(shared["step"])
        loader.load_state_dict(own["loader"])
        set_rng_state(own["rng"])

    log = MetricsLogger(run_dir, rank0, config.logging.tensorboard, config.logging.progress_bar, t.steps, start_step)
    if source is not None:
        log.message(f"resumed from {source} at step {start_step}")
    dp_group = parallel_state.get_data_parallel_group()  # sequences differ across these ranks only
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_cp_size = dist.get_world_size(dp_cp_group)
    flops_per_token = flops.training_flops_per_token(config.model, d.seq_len)
    peak = flops.peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None

    train_iter = iter(loader)
    last_checkpoint = None
    summary: dict = {"run_dir": str(run_dir), "start_step": start_step}
    window_tokens, window_start = 0.0, time.perf_counter()
    loss_value = math.nan
    for step in range(start_step, t.steps):
        micro = [next(train_iter) for _ in range(t.grad_accum_steps)]
        step_tokens = _sum(torch.tensor(float(sum(b.num_tokens() for b in micro)), device=device), dp_group)
        scale = dp_cp_size * t.grad_accum_steps / step_tokens.clamp(min=1)
        lr = optimizer.param_groups[0]["lr"]
        local_loss = torch.zeros((), dtype=torch.float64, device=device)
        for batch in micro:
            ids, labels, layout = model_inputs(batch, device)
            loss_sum, _ = engine(ids, layout, labels, t.loss_chunk_tokens)
            engine.backward(loss_sum * scale)
            engine.step()
            local_loss += loss_sum.detach().double()
        loss_value = (_sum(local_loss, dp_cp_group) / step_tokens.double().clamp(min=1)).item()
        window_tokens += step_tokens.item()
        done = step + 1
        log.advance()
        maybe_fail("after_step", done)

        scalars = {}
        if done % config.logging.log_interval == 0 or done == t.steps or step == start_step:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            tokens_per_s = window_tokens / elapsed
            tflops = tokens_per_s * flops_per_token / par.world_size / 1e12
            scalars = {"train/loss": loss_value, "train/lr": lr,
                       "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                       "perf/tokens_per_s": tokens_per_s, "perf/tflops": tflops,
                       "perf/step_time_s": elapsed / max(1, done - summary.get("last_logged", start_step)),
                       "perf/peak_memory_gib": peak_memory_gib()}
            if peak:
                scalars["perf/mfu"] = tflops / peak
            summary["last_logged"] = done
            window_tokens, window_start = 0.0, time.perf_counter()
        if t.eval_interval and (done % t.eval_interval == 0 or done == t.steps):
            scalars["eval/loss"] = evaluate(engine, eval_loader, config, device)
        if scalars:
            log.log(done, scalars)
            if "train/loss" in scalars:
                log.message(f"step {done:>6}/{t.steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                            f"tok/s {scalars['perf/tokens_per_s']:.0f}  TFLOP/s {scalars['perf/tflops']:.2f}"
                            + (f"  eval {scalars['eval/loss']:.4f}" if "eval/loss" in scalars else ""))
            if hooks.on_log:
                hooks.on_log(done, scalars)
        if (config.checkpoint.interval and done % config.checkpoint.interval == 0) or done == t.steps:
            last_checkpoint = checkpoints.save(engine, done, {"step": done},
                                               {"loader": loader.state_dict(), "rng": rng_state()})
            if hooks.on_checkpoint:
                hooks.on_checkpoint(done, last_checkpoint, scalars)
    log.close()
    summary.update(steps=t.steps, loss=loss_value, checkpoint=str(last_checkpoint) if last_checkpoint else None)
    summary.pop("last_logged", None)
    return summary
