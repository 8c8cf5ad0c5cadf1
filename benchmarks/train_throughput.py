"""End-to-end training throughput on one GPU: lctrain's real training step (DeepSpeed bf16 engine, the configured
activation checkpointing, chunked loss, AdamW) against flash-linear-attention's GatedDeltaNetForCausalLM in a plain
torch loop, in the same run on the same GPU. One table.

    python benchmarks/train_throughput.py                       # every ~1.3B config, T = 16k, 65k, 131k, and the peer
    python benchmarks/train_throughput.py --config gdn_h1_1p3b --T 65536 --max-T   # also the longest T that trains
    python benchmarks/train_throughput.py --tiny                # CPU dry run of the same code path, tiny shapes

Per row: tokens/s; achieved TFLOP/s = tokens/s x training FLOPs per token (lctrain.train.flops: 3 x (2 per weight of
every projection and the output layer + each mixer's own FLOPs), for the peer the 6N rule on its non-embedding
parameters plus its output layer, the same convention); MFU against the dense bf16 peak and against the matmul
ceiling measured in this run; peak memory; and the step split into forward, backward, optimizer, with the
forward+backward time of each sublayer kind (less its RMSNorm), the norms, the loss and the rest measured one by
one (same T, same checkpointing).
Inputs are random tokens in one document per sequence (B = 1); timings are medians over the timed steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = ["gdn_1p3b", "gdn_h1_1p3b", "gdn_h2_1p3b", "gsa_1p3b", "bst_1p3b"]
TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.vocab_size=512",
        "model.gated_deltanet.num_heads=2", "model.gated_deltanet.num_value_heads=4", "model.gated_deltanet.head_k_dim=16",
        "model.gated_deltanet.head_v_dim=16", "model.attention.num_heads=2", "model.attention.num_kv_heads=2",
        "model.attention.head_dim=32", "model.attention.window=32", "model.gated_slot_attention.num_heads=2",
        "model.gated_slot_attention.head_k_dim=16", "model.gated_slot_attention.head_v_dim=16",
        "model.gated_slot_attention.num_slots=8", "model.mamba2.head_dim=16", "model.mamba2.state_size=8",
        "model.block_state.block_size=32", "model.block_state.num_heads=2", "model.block_state.ssm_state_size=4",
        "train.loss_chunk_tokens=64"]


@dataclasses.dataclass
class Row:
    config: str
    T: int
    impl: str
    tokens_per_s: float = float("nan")
    tflops: float = float("nan")
    peak_gib: float = float("nan")
    step_ms: float = float("nan")
    breakdown: str = ""
    note: str = ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def lctrain_rows(name: str, lengths: list[int], args, device) -> Iterator[Row]:
    import deepspeed

    from lctrain.config import load_config
    from lctrain.model.hybrid import HybridModel, transformer_config
    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.train.flops import training_flops_per_token
    from lctrain.train.loop import build_optimizer, deepspeed_config
    from lctrain.train.zero_step import fuse_gradient_checks

    overrides = TINY + [f"model.pattern={args.tiny_pattern or load_config(ROOT / 'configs' / f'{name}.yaml').model.pattern[:6]}"] if args.tiny else []
    config = load_config(ROOT / "configs" / f"{name}.yaml", overrides + args.set + [f"data.seq_len={max(lengths)}"],
                         validate=False)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    model = HybridModel(config.model, transformer_config(config.model))
    model.set_checkpointing(config.train)
    model.to(device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config, device),
                                      config=deepspeed_config(config, bf16), dist_init_required=False)
    if not args.deepspeed_step:
        fuse_gradient_checks(engine.optimizer)  # as lctrain.train.loop does
    print(f"{name}: model built and DeepSpeed engine ready", flush=True)
    for T in lengths:
        row = Row(name, T, "lctrain")
        ids = torch.randint(0, config.model.vocab_size, (1, T), device=device)
        labels = torch.roll(ids, -1, 1)
        layout = layout_from_cu_seqlens(torch.tensor([0, T]), 1, T).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        phases = {"forward": [], "backward": [], "optimizer": []}
        try:
            for step in range(args.warmup + args.steps):
                out = {}
                f = timed(lambda: out.update(loss=engine(ids, layout, labels, config.train.loss_chunk_tokens)), device)
                loss_sum, count = out["loss"]
                b = timed(lambda: engine.backward(loss_sum / count), device)
                o = timed(engine.step, device)
                if step >= args.warmup:
                    for key, value in zip(phases, (f, b, o)):
                        phases[key].append(value)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
            yield row
            torch.cuda.empty_cache()
            continue
        median = {k: statistics.median(v) for k, v in phases.items()}
        row.step_ms = sum(median.values())
        row.tokens_per_s = T / row.step_ms * 1e3
        row.tflops = row.tokens_per_s * training_flops_per_token(config.model, T) / 1e12
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        if args.profile and device.type == "cuda":
            profile_step(engine, ids, layout, labels, config.train.loss_chunk_tokens)
        if not args.no_breakdown:
            parts = component_times(engine.module, config, T, device)
            rest = median["forward"] + median["backward"] - sum(ms for ms, _ in parts.values())
            shares = {**parts, "other fwd/bwd": (rest, 1), "optimizer": (median["optimizer"], 1)}
            row.breakdown = ", ".join(f"{k} {ms / row.step_ms:.0%}" + (f" ({ms / n:.1f} ms x {n})" if n > 1 else "")
                                      for k, (ms, n) in shares.items())
        row.note = f"fwd {median['forward']:.0f} / bwd {median['backward']:.0f} / opt {median['optimizer']:.0f} ms"
        yield row


def profile_step(engine, ids, layout, labels, loss_chunk_tokens: int) -> None:
    """One more training step under torch.profiler: the 12 kernels with the most CUDA time in each phase."""
    from torch.profiler import ProfilerActivity, profile, record_function

    phases = {}
    for phase in ("forward", "backward", "optimizer"):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with record_function(phase):
                if phase == "forward":
                    out = engine(ids, layout, labels, loss_chunk_tokens)
                elif phase == "backward":
                    engine.backward(out[0] / out[1])
                else:
                    engine.step()
            torch.cuda.synchronize()
        phases[phase] = prof
    for phase, prof in phases.items():
        events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                        key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in events) / 1e3
        print(f"profile {phase}: {total:.1f} ms of kernels", flush=True)
        for e in events[:12]:
            print(f"  {e.device_time_total / 1e3:8.2f} ms {e.count:6d} x  {e.key[:110]}", flush=True)


def component_times(module, config, T: int, device) -> dict[str, tuple[float, int]]:
    """Forward + backward milliseconds of each sublayer kind (summed over its occurrences, with the count), of the
    RMSNorms and of the loss, each run alone on random activations, with the step's activation checkpointing
    (recompute in backward). A sublayer kind's and the loss's entries exclude their norm (one norm timed alone,
    subtracted); "norms" is every pre-norm and the final norm."""
    from torch.utils.checkpoint import checkpoint

    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.model.loss import chunked_cross_entropy
    from lctrain.model.registry import LAYERS

    dtype = next(module.parameters()).dtype
    layout = layout_from_cu_seqlens(torch.tensor([0, T]), 1, T).to(device)
    x = torch.randn(1, T, config.model.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    checkpointed = config.train.activation_checkpointing != "none"  # offload's copies not timed here
    times: dict[str, tuple[float, int]] = {}
    seen: dict[str, int] = {}
    for layer in module.layers:
        seen[layer.symbol] = seen.get(layer.symbol, 0) + 1

    def median_ms(fn, *args) -> float:
        fn(*args)
        return statistics.median(timed(lambda: fn(*args), device) for _ in range(3))

    def run(layer, *inputs):
        params = [p for p in layer.parameters() if p.requires_grad]
        recompute = checkpointed and getattr(layer, "symbol", None) not in set(config.train.activation_checkpointing_skip)
        out = checkpoint(layer, x, *inputs, use_reentrant=False) if recompute else layer(x, *inputs)
        torch.autograd.grad(out, [x] + params, grad)  # captured, not accumulated into .grad

    norm_ms = median_ms(run, module.final_norm)
    for symbol, count in seen.items():
        layer = next(l for l in module.layers if l.symbol == symbol)
        times[LAYERS[symbol].name] = ((median_ms(run, layer, layout) - norm_ms) * count, count)
    times["norms"] = (norm_ms * (len(module.layers) + 1), len(module.layers) + 1)
    labels = torch.randint(0, config.model.vocab_size, (T,), device=device)
    weight = module.output_weight

    def loss():
        hidden = module.final_norm(x)[0]
        value = chunked_cross_entropy(hidden, weight, labels, config.model.vocab_size, 0, config.train.loss_chunk_tokens)
        torch.autograd.grad(value, [x, weight])

    times["loss"] = (median_ms(loss) - norm_ms, 1)
    return times


def peer_rows(lengths: list[int], args, device) -> Iterator[Row]:
    """flash-linear-attention's GatedDeltaNetForCausalLM, default config (1.39B), bf16, fused AdamW, gradient
    checkpointing, fused linear cross-entropy; its Hopper guard bypassed for timing only."""
    rows = [Row("fla GDN 1.39B", T, "peer") for T in lengths]
    if device.type != "cuda":
        for r in rows:
            r.note = "peer needs CUDA"
        yield from rows
        return
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    except ImportError as e:
        for r in rows:
            r.note = f"fla unavailable: {e}"
        yield from rows
        return
    chunk_o.TRITON_ABOVE_3_7_1 = True
    cfg = GatedDeltaNetConfig(fuse_cross_entropy=False, fuse_linear_cross_entropy=True)
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    params = sum(p.numel() for p in model.parameters())
    embedding = model.model.embeddings.weight.numel()
    flops_per_token = 6 * (params - embedding)  # the 6N rule (output layer included, embedding lookup not)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for row in rows:
        T = row.T
        ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)
        torch.cuda.reset_peak_memory_stats()
        samples = []
        try:
            for step in range(args.warmup + args.steps):
                def one():
                    out = model(input_ids=ids, labels=ids)
                    out.loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                ms = timed(one, device)
                if step >= args.warmup:
                    samples.append(ms)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            yield row
            continue
        row.step_ms = statistics.median(samples)
        row.tokens_per_s = T / row.step_ms * 1e3
        row.tflops = row.tokens_per_s * flops_per_token / 1e12
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.note = f"{params / 1e9:.2f}B params, 6N FLOPs"
        yield row


ROW_PREFIX = "ROW "


def isolated_rows(what: str, lengths: list[int], args) -> list[Row]:
    """The rows of one config (or of the peer: what = "peer"), measured in a fresh process. In one process a
    finished config's DeepSpeed engine stayed reachable (~18 GiB still allocated after engine.destroy() and gc, seen
    on an H100) and the next config's peak memory counted it; an out-of-memory row's partial graph likewise."""
    argv = [sys.executable, __file__, "--child", what, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += [a for T in lengths for a in ("--T", str(T))] + [a for kv in args.set for a in ("--set", kv)]
    argv += [flag for flag, on in (("--tiny", args.tiny), ("--profile", args.profile), ("--no-breakdown", args.no_breakdown),
                                   ("--deepspeed-step", args.deepspeed_step)) if on]
    argv += ["--tiny-pattern", args.tiny_pattern] if args.tiny_pattern else []
    rows = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            if line.startswith(ROW_PREFIX):  # each row as the child measures it: a later crash keeps it
                rows.append(Row(**json.loads(line[len(ROW_PREFIX):])))
                print("measured:", rows[-1], flush=True)
            else:
                print(line, end="", flush=True)
    measured = {r.T for r in rows}
    label = "fla GDN 1.39B" if what == "peer" else what
    return rows + [Row(label, T, "peer" if what == "peer" else "lctrain", note=f"process exited {child.returncode}")
                   for T in lengths if T not in measured]


def longest_trainable(name: str, measured: list[Row], args) -> str:
    """The longest T that trains one step: the table's longest row that trained, then doubling past it until a step
    runs out of memory (no search when the table's longest length already did)."""
    trained = [r for r in measured if r.config == name and not math.isnan(r.step_ms)]
    good = max(((r.T, r.peak_gib) for r in trained), default=None)
    last = max((r for r in measured if r.config == name), key=lambda r: r.T)
    T, end = last.T * 2, f"{last.T}: {last.note}" if math.isnan(last.step_ms) else None
    while end is None and T <= args.max_T_limit:
        sub = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0, "profile": False,
                                                 "no_breakdown": True})
        row = isolated_rows(name, [T], sub)[0]
        if row.note == "out of memory":
            end = f"{T} ran out of memory"
        elif math.isnan(row.step_ms):  # not measured: the process failed for another reason
            end = f"stopped at {T}: {row.note}"
        else:
            good, T = (T, row.peak_gib), T * 2
    end = end or f"stopped at the limit {args.max_T_limit} (--max-T-limit)"
    longest = f"{good[0]} (peak {good[1]:.1f} GiB)" if good else "none"
    return f"longest T that trained one step of {name}: {longest}; {end}"


def print_table(rows: list[Row], gpu: str, ceiling: float, peak: float | None) -> str:
    lines = [f"== end-to-end training, B=1, bf16, on {gpu}; matmul ceiling {ceiling:.0f} TFLOP/s measured, "
             f"dense bf16 peak {peak or float('nan'):.0f}",
             f"{'config':16} {'T':>7} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'%ceil':>6} {'GiB':>6} {'step ms':>9}  notes"]
    for r in rows:
        mfu = r.tflops / peak if peak else float("nan")
        lines.append(f"{r.config:16} {r.T:>7} {r.tokens_per_s:>9.0f} {r.tflops:>8.1f} {mfu:>6.1%} "
                     f"{r.tflops / ceiling:>6.1%} {r.peak_gib:>6.1f} {r.step_ms:>9.1f}  {r.note}")
        if r.breakdown:
            lines.append(f"{'':16} {'':>7}   breakdown: {r.breakdown}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=CONFIGS)
    parser.add_argument("--T", type=int, action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--max-T", action="store_true", help="also find the longest T that trains (doubling)")
    parser.add_argument("--max-T-limit", type=int, default=1 << 21)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with tiny shapes")
    parser.add_argument("--tiny-pattern", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for lctrain's rows, as launch/train.py's --set")
    parser.add_argument("--no-breakdown", action="store_true", help="skip timing each sublayer kind alone")
    parser.add_argument("--profile", action="store_true", help="print each phase's top CUDA kernels of one step")
    parser.add_argument("--deepspeed-step", action="store_true",
                        help="DeepSpeed's own per-tensor overflow check and float64 norm (without lctrain.train.zero_step)")
    parser.add_argument("--out", help="append the table to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one config's (or "peer") rows, in this process
    args = parser.parse_args(argv)

    from harness import measure_ceilings

    from lctrain.parallel.groups import init_parallel
    from lctrain.train.flops import peak_tflops

    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    lengths = args.T or ([128, 256] if args.tiny else [16384, 65536, 131072])
    if args.child:
        init_parallel()
        for row in (peer_rows(lengths, args, device) if args.child == "peer" else
                    lctrain_rows(args.child, lengths, args, device)):
            print(ROW_PREFIX + json.dumps(dataclasses.asdict(row)), flush=True)
        return 0
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny dry run)"
    ceiling = measure_ceilings().matmul_tflops if device.type == "cuda" else float("nan")
    peak = peak_tflops(gpu) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The peer first: its autotuning compiles for minutes on a fresh machine, and a call cut short should still
    # leave its rows (lctrain's rows print as each is measured).
    peer = [] if args.no_peer else isolated_rows("peer", lengths, args)
    rows: list[Row] = []
    for name in args.config or CONFIGS:
        rows += isolated_rows(name, lengths, args)
    rows += peer
    text = print_table(rows, gpu, ceiling, peak)
    if args.max_T:
        for name in args.config or ["gdn_h1_1p3b"]:
            line = longest_trainable(name, rows, args)
            print(line, flush=True)
            text += "\n" + line
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
