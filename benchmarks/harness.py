"""Timing, ceilings and tables shared by every benchmark in this folder.

Method (the device tool's METHOD.md): time with CUDA events after warm-up, take the median of many repetitions,
rotate among several input sets so repeated runs do not measure the cache, and compare achieved rates with ceilings
measured on the same GPU in the same run (a large bf16 matmul; a large device-to-device copy counting read + write).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Sequence

import torch


def time_ms(fn: Callable[[int], object], warmup: int = 3, reps: int = 20, rotate: int = 1) -> float:
    """Median milliseconds of fn(i) over ``reps`` calls, i cycling over ``rotate`` input sets.

    A fixed repetition count (not do_bench's adaptive one) so that collectives inside fn stay in step across ranks.
    """
    if not torch.cuda.is_available():
        import time

        fn(0)
        samples = []
        for i in range(max(1, reps // 4)):
            t0 = time.perf_counter()
            fn(i % rotate)
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    for i in range(warmup):
        fn(i % rotate)
    torch.cuda.synchronize()
    samples = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % rotate)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in flat_outputs(o)]


def step_functions(forward: Callable[[dict], object], sets: Sequence[dict]):
    """(fwd(i), fwd_bwd(i)) for ``time_ms(..., rotate=len(sets))``: the forward on input set i, and the forward plus
    the gradients of every input that requires one, from a fixed random cotangent per differentiable output."""
    grads = [[torch.randn_like(o) for o in flat_outputs(forward(s)) if o.requires_grad] for s in sets]

    def fwd(i):
        return forward(sets[i])

    def fwd_bwd(i):
        outs = [o for o in flat_outputs(forward(sets[i])) if o.requires_grad]
        leaves = [t for t in sets[i].values() if isinstance(t, torch.Tensor) and t.requires_grad]
        # allow_unused: a reference impl (e.g. attention beside a recurrence) may ignore some inputs
        torch.autograd.grad(outs, leaves, grads[i][: len(outs)], allow_unused=True)

    return fwd, fwd_bwd


@dataclasses.dataclass
class Ceilings:
    matmul_tflops: float  # bf16 dense matmul, measured
    copy_gbs: float  # device-to-device copy, bytes read + written, measured


def tuning_sweep(fused, variants: Sequence[dict], forward: Callable[[dict], object],
                 make_inputs: Callable, T: int, label: str) -> None:
    """For a GPU session, each line printed as soon as measured: fwd and fwd+bwd of ``forward`` at T under the kernel
    module's default ``fused.TUNING`` (a dataclass) and under each variant (overrides of its fields); the default is
    restored after. On CPU a dry run of the same code (float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"on {name}, torch {torch.__version__}, triton {__import__('triton').__version__}", flush=True)
    sets = [make_inputs(T, seed, device, dtype) for seed in range(3)]
    fwd, fwd_bwd = step_functions(forward, sets)
    defaults = fused.TUNING
    try:
        for overrides in [{}] + list(variants):
            fused.TUNING = dataclasses.replace(defaults, **overrides)
            f, fb = time_ms(fwd, rotate=len(sets)), time_ms(fwd_bwd, rotate=len(sets))
            print(f"  {label} [T={T}] {fused.TUNING}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    finally:
        fused.TUNING = defaults


def measure_ceilings() -> Ceilings:
    if not torch.cuda.is_available():
        return Ceilings(float("nan"), float("nan"))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = time_ms(lambda i: a @ b, warmup=3, reps=10)
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    cp = time_ms(lambda i: dst.copy_(src), warmup=3, reps=10)
    return Ceilings(2 * n**3 / mm / 1e9, 2 * src.numel() * 2 / cp / 1e6)


@dataclasses.dataclass
class Measurement:
    op: str
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    T: int
    ms: float
    flops: float  # useful floating-point operations of the op (counted from the math, not the kernel)
    bytes: float  # fewest bytes the op must move (each input read once, each output written once)
    note: str = ""


def print_table(rows: Sequence[Measurement], ceilings: Ceilings, title: str, baseline_impl: str | None = None) -> str:
    """Print (and return) one table: time, achieved TFLOP/s and GB/s with their fraction of the measured ceilings."""
    base = {(r.mode, r.T): r.ms for r in rows if r.impl == baseline_impl and r.ms == r.ms}
    head = f"{'op':8} {'impl':14} {'mode':8} {'T':>7} {'ms':>9} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>7} {'%copy':>5}"
    if baseline_impl:
        head += f" {'vs ' + baseline_impl:>10}"
    lines = [title, f"ceilings: matmul {ceilings.matmul_tflops:.0f} TFLOP/s, copy {ceilings.copy_gbs:.0f} GB/s", head]
    for r in rows:
        tf = r.flops / r.ms / 1e9 if r.ms == r.ms else float("nan")
        gb = r.bytes / r.ms / 1e6 if r.ms == r.ms else float("nan")
        line = (f"{r.op:8} {r.impl:14} {r.mode:8} {r.T:>7} {r.ms:>9.3f} {tf:>8.1f} {100 * tf / ceilings.matmul_tflops:>5.1f}"
                f" {gb:>7.0f} {100 * gb / ceilings.copy_gbs:>5.1f}")
        if baseline_impl:
            b = base.get((r.mode, r.T))
            line += f" {r.ms / b:>9.2f}x" if b else f" {'-':>10}"
        if r.note:
            line += f"  {r.note}"
        lines.append(line)
    text = "\n".join(lines)
    print(text, flush=True)
    return text
