"""Context-parallel weak scaling on several GPUs of one host (issue 6): one table at the end.

    python benchmarks/cp_scaling.py --gpus 4                  # every phase; results under --out (default cp_scaling/)
    python benchmarks/cp_scaling.py --gpus 2 --phases kernel  # one phase
    python benchmarks/cp_scaling.py --dry-run                 # CPU, gloo, tiny shapes: the same code paths

Each phase is its own ``torchrun --nproc_per_node N`` launch of this file (``--worker PHASE``), so an out-of-memory
or crash ends only that phase (its log's tail goes into results.json). Timings use a fixed count of steps on every rank (collectives stay in step), CUDA
events, median per rank; a group's step time is its slowest rank's.

  model    a training step's forward + backward (bf16, block activation checkpointing, chunked loss; no optimizer) of
           the ~1.3B GDN-H1 config at --tokens-per-gpu tokens per GPU, one document per sequence (every rank carries
           state), context_parallel_size 1, 2, 4 (weak scaling: the sequence grows with the group; all GPUs busy,
           groups of consecutive ranks). Per-GPU tokens/s, efficiency against size 1, peak memory, and the bytes the
           context-parallel collectives bring into a rank per step; then one G and one W sublayer alone
           (forward + backward) at 1x and 2x the tokens: bytes per layer per step, which must not grow with length.
  kernel   the gated delta rule alone, H16 D128, --tokens-per-gpu per rank, forward + backward: lctrain's kernel
           (size 1) and its context-parallel scan (sizes 2, 4) against flash-linear-attention's chunk_gated_delta_rule
           without and with ``cp_context`` (fla.ops.cp.build_cp_context).
  longest  one whole-group training step (forward, backward, AdamW) at --tokens-per-gpu x 2^i tokens per GPU, one
           launch each, doubling until a launch fails: the longest sequence that trains one step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
MODEL_CONFIG = ROOT / "configs" / "gdn_h1_1p3b.yaml"
TINY = ["model.pattern=G-W-", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.vocab_size=512",
        "model.gated_deltanet.num_heads=2", "model.gated_deltanet.num_value_heads=4", "model.gated_deltanet.head_k_dim=16",
        "model.gated_deltanet.head_v_dim=16", "model.attention.num_heads=2", "model.attention.num_kv_heads=2",
        "model.attention.head_dim=32", "model.attention.window=16", "model.chunk_size=16"]
KERNEL_SHAPE = {"heads": 16, "dim": 128}
TINY_KERNEL_SHAPE = {"heads": 2, "dim": 16}


# ----------------------------------------------------------------------------------------------------------------
# workers (one process per GPU under torchrun)


def _setup(args):
    import torch
    import torch.distributed as dist

    from lctrain.parallel.groups import init_parallel

    par = init_parallel(1, 1, timeout_minutes=5)  # megatron's state (tensor-parallel size 1) for the layers
    world = dist.get_world_size()
    sizes = [cp for cp in (1, 2, 4, 8) if cp <= world and world % cp == 0]
    groups = {}
    for cp in sizes:  # every rank creates every group, in the same order
        for first in range(0, world, cp):
            group = dist.new_group(list(range(first, first + cp)))
            if first <= par.rank < first + cp:
                groups[cp] = group
    torch.manual_seed(0)
    return par, sizes, groups


def _model_config(args, tokens_per_gpu: int, cp: int):
    from lctrain.config import load_config

    overrides = [f"data.seq_len={tokens_per_gpu * cp}", *args.set]
    if args.dry_run:
        return load_config(None, TINY + overrides)
    return load_config(MODEL_CONFIG, overrides)


def _build_model(config, device, dtype):
    from lctrain.model.hybrid import HybridModel, transformer_config

    import torch

    torch.manual_seed(0)
    model = HybridModel(config.model, transformer_config(config.model)).to(device, dtype)
    model.set_checkpointing(config.train)
    return model.train()


def _sequence(tokens_per_gpu: int, cp: int, rank: int, group, vocab: int, device):
    """This rank's slice of one document of tokens_per_gpu x cp tokens: (ids, labels, layout)."""
    import torch

    from lctrain.parallel.sharding import shard_layout

    length = tokens_per_gpu * cp
    layout = shard_layout(torch.tensor([0, length], device=device), 1, length, rank, cp, group)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (1, tokens_per_gpu), generator=generator).to(device)
    labels = torch.randint(0, vocab, (1, tokens_per_gpu), generator=generator).to(device)
    return ids, labels, layout


def _slowest(value: float, group) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def worker_model(args) -> dict:
    import torch

    from harness import time_ms
    from lctrain.model.hybrid import Sublayer, transformer_config
    from lctrain.parallel.comm import count_traffic

    par, sizes, groups = _setup(args)
    device, dtype = par.device, torch.bfloat16 if par.device.type == "cuda" else torch.float32
    config = _model_config(args, args.tokens_per_gpu, 1)
    model = _build_model(config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    model_checkpointing = model.activation_checkpointing
    rows = []
    for cp in sizes:
        rank = par.rank % cp
        ids, labels, layout = _sequence(args.tokens_per_gpu, cp, rank, groups[cp], config.model.vocab_size, device)

        def step(_):
            loss, count = model(ids, layout, labels, config.train.loss_chunk_tokens)
            (loss / count).backward()
            model.zero_grad(set_to_none=True)

        _reset_peak()
        step(0)  # compiles kernels outside the traffic count's second step
        with count_traffic() as traffic:
            step(0)
        ms = _slowest(time_ms(step, warmup=1, reps=args.iters), groups[cp])
        rows.append({"cp": cp, "seq_len": args.tokens_per_gpu * cp, "ms": ms,
                     "tokens_per_s_per_gpu": args.tokens_per_gpu / ms * 1e3, "peak_gib": _slowest(_peak_gib(), groups[cp]),
                     "bytes_per_step": dict(traffic)})
    base = rows[0]["tokens_per_s_per_gpu"]
    for row in rows:
        row["efficiency"] = row["tokens_per_s_per_gpu"] / base
    del model

    # Per layer: one G and one W sublayer alone at the largest group size, 1x and 2x the tokens.
    cp = sizes[-1]
    layers = []
    tconfig = transformer_config(config.model)
    for symbol in dict.fromkeys(s for s in config.model.pattern if s in "GW*SMB"):
        torch.manual_seed(0)
        layer = Sublayer(tconfig, config.model, symbol).to(device, dtype)
        for scale in (1, 2):
            tokens = args.tokens_per_gpu * scale
            _, _, layout = _sequence(tokens, cp, par.rank % cp, groups[cp], 2, device)
            x = torch.randn(1, tokens, config.model.hidden_size, device=device, dtype=dtype, requires_grad=True)
            with count_traffic() as traffic:
                layer(x, layout).backward(torch.ones_like(x))
            layers.append({"symbol": symbol, "cp": cp, "tokens_per_gpu": tokens, "bytes": dict(traffic)})
        del layer
    return {"phase": "model", "params": params, "tokens_per_gpu": args.tokens_per_gpu, "rows": rows, "layers": layers,
            "dtype": str(dtype).removeprefix("torch."), "checkpointing": model_checkpointing,
            "config": "tiny" if args.dry_run else MODEL_CONFIG.name}


def _gdn_inputs(tokens: int, heads: int, dim: int, device, dtype, seed: int):
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    q = F.normalize(randn(1, tokens, heads, dim), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(randn(1, tokens, heads, dim), dim=-1).to(dtype).requires_grad_()
    v = randn(1, tokens, heads, dim).to(dtype).requires_grad_()
    g = (F.logsigmoid(randn(1, tokens, heads)) / 16).requires_grad_()
    beta = torch.sigmoid(randn(1, tokens, heads)).to(dtype).requires_grad_()
    return q, k, v, g, beta, randn(1, tokens, heads, dim).to(dtype)


def worker_kernel(args) -> dict:
    import torch

    from harness import time_ms
    from lctrain.kernels.gated_delta import chunk_gated_delta_rule
    from lctrain.model.gated_deltanet import GatedDeltaRecurrence
    from lctrain.parallel.sharding import shard_layout

    par, sizes, groups = _setup(args)
    device, dtype = par.device, torch.bfloat16 if par.device.type == "cuda" else torch.float32
    shape = TINY_KERNEL_SHAPE if args.dry_run else KERNEL_SHAPE
    tokens = args.tokens_per_gpu
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
        from fla.ops.cp import build_cp_context

        fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1
        fla_missing = None
    except Exception as error:  # noqa: BLE001 - the peer is optional: report why it did not run
        fla_missing = f"fla unavailable: {type(error).__name__}: {error}"

    def ours(inputs, cp, rank):
        q, k, v, g, beta, do = inputs
        length = tokens * cp
        if cp == 1:
            cu = torch.tensor([0, tokens], device=device)
            return lambda: chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)[0].backward(do)
        layout = shard_layout(torch.tensor([0, length], device=device), 1, length, rank, cp, groups[cp])
        return lambda: layout.context.scan(GatedDeltaRecurrence(q, k, v, g, beta), layout).backward(do)

    def peer(inputs, cp, rank):
        q, k, v, g, beta, do = inputs
        if cp == 1:
            cu = torch.tensor([0, tokens], device=device)
            return lambda: fla_chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)[0].backward(do)
        context = build_cp_context(torch.tensor([0, tokens * cp], device=device), group=groups[cp])
        return lambda: fla_chunk_gated_delta_rule(q, k, v, g, beta, cp_context=context)[0].backward(do)

    rows = []
    for impl, make in (("lctrain", ours), ("fla", peer)):
        for cp in sizes:
            row = {"impl": impl, "cp": cp, "tokens_per_rank": tokens, **shape}
            if impl == "fla" and fla_missing:
                rows.append({**row, "ms": float("nan"), "note": fla_missing})
                continue
            inputs = _gdn_inputs(tokens, shape["heads"], shape["dim"], device, dtype, seed=par.rank)
            try:
                run = make(inputs, cp, par.rank % cp)
                ms = _slowest(time_ms(lambda _: run(), warmup=2, reps=args.iters), groups[cp])
                rows.append({**row, "ms": ms})
                if par.rank == 0:  # in the launch's log as it goes: a launch cut by its time limit keeps these
                    print("measured:", json.dumps(rows[-1]), flush=True)
            except Exception as error:  # noqa: BLE001 - a failing peer call is reported, not fatal
                if impl == "lctrain":
                    raise
                rows.append({**row, "ms": float("nan"), "note": f"{type(error).__name__}: {str(error)[:200]}"})
    for row in rows:
        base = next(r["ms"] for r in rows if r["impl"] == row["impl"] and r["cp"] == 1)
        row["efficiency"] = base / row["ms"]
    return {"phase": "kernel", "rows": rows}


def worker_longest(args) -> dict:
    import torch
    import torch.distributed as dist

    par, sizes, groups = _setup(args)
    cp = dist.get_world_size()
    device, dtype = par.device, torch.bfloat16 if par.device.type == "cuda" else torch.float32
    config = _model_config(args, args.tokens_per_gpu, cp)
    model = _build_model(config, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids, labels, layout = _sequence(args.tokens_per_gpu, cp, par.rank, groups[cp], config.model.vocab_size, device)
    _reset_peak()
    start = time.perf_counter()
    loss, count = model(ids, layout, labels, config.train.loss_chunk_tokens)
    (loss / count).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = _slowest(time.perf_counter() - start, groups[cp])
    return {"phase": "longest", "cp": cp, "tokens_per_gpu": args.tokens_per_gpu, "seq_len": args.tokens_per_gpu * cp,
            "seconds": seconds, "peak_gib": _slowest(_peak_gib(), groups[cp]), "loss": loss.item() / count.item()}


WORKERS = {"model": worker_model, "kernel": worker_kernel, "longest": worker_longest}


def run_worker(args) -> None:
    import torch.distributed as dist

    from lctrain.parallel.groups import shutdown_parallel

    result = WORKERS[args.worker](args)
    if dist.get_rank() == 0:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (gloo)"
        result["world_size"] = dist.get_world_size()
        pathlib.Path(args.result).write_text(json.dumps(result, indent=1))
    shutdown_parallel()


# ----------------------------------------------------------------------------------------------------------------
# parent: launches, collects, prints


def launch(args, phase: str, tokens_per_gpu: int, logs: pathlib.Path) -> dict:
    """One torchrun launch of a phase; its result, or {"error": ...} with the log's tail."""
    result = logs / f"{phase}-{tokens_per_gpu}.json"
    log = logs / f"{phase}-{tokens_per_gpu}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.gpus),
           str(pathlib.Path(__file__).resolve()), "--worker", phase, "--result", str(result),
           "--tokens-per-gpu", str(tokens_per_gpu), "--iters", str(args.iters)]
    cmd += ["--dry-run"] * args.dry_run + sum((["--set", s] for s in args.set), [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        env.pop("TRITON_INTERPRET", None)  # CPU tensors take the kernels' torch paths: the dry run checks this script
        env["OMP_NUM_THREADS"] = "1"
    print(f"[{time.strftime('%H:%M:%S')}] {phase}: {tokens_per_gpu} tokens per GPU on {args.gpus} ranks", flush=True)
    try:
        with open(log, "w") as f:
            code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if code == 0 and result.is_file():
        return json.loads(result.read_text())
    tail = log.read_text()[-1500:] if log.is_file() else ""
    return {"phase": phase, "tokens_per_gpu": tokens_per_gpu, "error": f"exit {code}", "log_tail": tail}


def _bytes(counts: dict) -> str:
    return ", ".join(f"{kind} {value / 2**10:.1f} KiB" for kind, value in sorted(counts.items())) or "none"


def report(results: dict) -> str:
    lines = []
    model = results.get("model")
    if model and "error" not in model:
        lines.append(f"== model: {model['config']} ({model['params'] / 1e9:.2f}B parameters), {model['tokens_per_gpu']} "
                     f"tokens per GPU, {model['world_size']} x {model['device']}, forward + backward, {model['dtype']}, "
                     f"{'block' if model['checkpointing'] else 'no'} activation checkpointing ==")
        lines.append(f"{'cp':>3} {'seq_len':>9} {'ms/step':>9} {'tok/s/GPU':>10} {'efficiency':>10} {'peak GiB':>9}  CP bytes into a rank per step")
        for r in model["rows"]:
            lines.append(f"{r['cp']:>3} {r['seq_len']:>9} {r['ms']:>9.1f} {r['tokens_per_s_per_gpu']:>10.0f} "
                         f"{r['efficiency']:>10.3f} {r['peak_gib']:>9.1f}  {_bytes(r['bytes_per_step'])}")
        lines.append("per sublayer alone, forward + backward (bytes into a rank; must not grow with the tokens):")
        for r in model["layers"]:
            lines.append(f"  {r['symbol']}  cp={r['cp']}  {r['tokens_per_gpu']:>8} tokens/GPU: {_bytes(r['bytes'])}")
    elif model:
        lines.append(f"== model: FAILED ({model['error']}) ==\n{model['log_tail']}")
    kernel = results.get("kernel")
    if kernel and "error" not in kernel:
        r0 = kernel["rows"][0]
        lines.append(f"== kernel: gated delta rule H{r0['heads']} D{r0['dim']}, {r0['tokens_per_rank']} tokens per rank, "
                     f"forward + backward, {kernel['world_size']} x {kernel['device']} ==")
        lines.append(f"{'impl':8} {'cp':>3} {'ms':>9} {'efficiency':>10}")
        for r in kernel["rows"]:
            lines.append(f"{r['impl']:8} {r['cp']:>3} {r['ms']:>9.2f} {r['efficiency']:>10.3f}  {r.get('note', '')}")
    elif kernel:
        lines.append(f"== kernel: FAILED ({kernel['error']}) ==\n{kernel['log_tail']}")
    longest = results.get("longest")
    if longest:
        lines.append("== longest sequence, one training step (forward, backward, AdamW), all GPUs one group ==")
        for r in longest:
            if "error" in r:
                lines.append(f"  {r['tokens_per_gpu']:>9} tokens/GPU: failed ({r['error']}; last log line: "
                             f"{r['log_tail'].strip().splitlines()[-1] if r['log_tail'].strip() else ''})")
            else:
                lines.append(f"  {r['tokens_per_gpu']:>9} tokens/GPU = {r['seq_len']:>9} tokens: {r['seconds']:.1f} s, "
                             f"peak {r['peak_gib']:.1f} GiB, loss {r['loss']:.3f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="ranks per launch (default: all GPUs; 2 in --dry-run)")
    parser.add_argument("--phases", default="model,kernel,longest")
    parser.add_argument("--tokens-per-gpu", type=int, default=None, help="default 65536 (64 in --dry-run)")
    parser.add_argument("--max-tokens-per-gpu", type=int, default=None, help="longest phase stops here (default 2^20)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per measurement (same on every rank)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per launch")
    parser.add_argument("--out", default="cp_scaling", help="folder for results.json and table.txt (nothing else)")
    parser.add_argument("--logs", help="folder for each launch's log and result (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="config override for the model, e.g. model.pattern=G-")
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny model and shapes")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tokens_per_gpu = args.tokens_per_gpu or (64 if args.dry_run else 65536)
    if args.worker:
        run_worker(args)
        return 0
    import torch

    args.gpus = args.gpus or (2 if args.dry_run else torch.cuda.device_count())
    if args.gpus < 1 or (not args.dry_run and args.gpus > torch.cuda.device_count()):
        print(f"cp_scaling: error: --gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPUs "
              f"(use --dry-run on a CPU)", file=sys.stderr)
        return 2
    phases = args.phases.split(",")
    unknown = set(phases) - set(WORKERS)
    if unknown:
        print(f"cp_scaling: error: unknown phase(s) {sorted(unknown)}; allowed: {', '.join(WORKERS)}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = pathlib.Path(args.logs or tempfile.mkdtemp(prefix="cp_scaling_"))
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for phase in ("model", "kernel"):
        if phase in phases:
            results[phase] = launch(args, phase, args.tokens_per_gpu, logs)
    if "longest" in phases:
        limit = args.max_tokens_per_gpu or (2 * args.tokens_per_gpu if args.dry_run else 2**20)
        results["longest"] = []
        tokens = args.tokens_per_gpu
        while tokens <= limit:
            results["longest"].append(launch(args, "longest", tokens, logs))
            if "error" in results["longest"][-1]:
                break
            tokens *= 2
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.txt").write_text(report(results))
    failed = [p for p in ("model", "kernel") if "error" in results.get(p, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
