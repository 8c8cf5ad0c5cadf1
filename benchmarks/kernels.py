"""Kernel benchmark: lctrain vs the peer on the same GPU in one run, one table per op.

    python benchmarks/kernels.py --op gdn          (gsa, fftconv; several: --op gdn --op gsa)
    python benchmarks/kernels.py --op gdn --tiny   (CPU dry run with tiny shapes, to check the script)

Forward is timed with gradients enabled (a training forward); fwd+bwd adds a backward of a fixed random cotangent.
Each impl rotates among three input sets. Rates are set against the matmul and copy ceilings measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import Ceilings, Measurement, measure_ceilings, print_table, step_functions, time_ms  # noqa: E402
from kernel_ops import OpSpec  # noqa: E402

OPS = ["gdn", "gsa", "fftconv", "short_conv", "norms", "swiglu", "rope"]


def benchmark(spec: OpSpec, lengths: list[int], device: torch.device, dtype: torch.dtype, reps: int) -> list[Measurement]:
    rows = []
    for T in lengths:
        op_cost = spec.cost(T)
        sets = [spec.make_inputs(T, seed, device, dtype) for seed in range(3)]
        for impl in spec.impls():
            if impl.unavailable:
                for mode in ("fwd", "fwd+bwd"):
                    rows.append(Measurement(spec.name, impl.name, mode, T, float("nan"), 0, 0, impl.unavailable))
                continue
            fwd_flops, fwd_bytes, bwd_flops, bwd_bytes = impl.cost(T) if impl.cost else op_cost
            fwd, fwd_bwd = step_functions(impl.forward, sets)
            for mode, fn, flops, nbytes in (("fwd", fwd, fwd_flops, fwd_bytes),
                                            ("fwd+bwd", fwd_bwd, fwd_flops + bwd_flops, fwd_bytes + bwd_bytes)):
                try:
                    ms = time_ms(fn, reps=reps, rotate=len(sets))
                    note = ""
                except torch.cuda.OutOfMemoryError:
                    ms, note = float("nan"), "out of memory"
                    torch.cuda.empty_cache()
                rows.append(Measurement(spec.name, impl.name, mode, T, ms, flops, nbytes, note))
                print(f"  measured {spec.name} {impl.name} {mode} T={T}: {ms:.3f} ms {note}", flush=True)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=OPS, required=True)
    parser.add_argument("--T", type=int, action="append", help="sequence lengths (default: the op's own list)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, times nothing real")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", help="also append the tables to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceilings = measure_ceilings() if device.type == "cuda" else Ceilings(float("nan"), float("nan"))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny dry run)"
    texts = []
    for op in args.op:
        spec: OpSpec = importlib.import_module(f"kernel_ops.{op}").SPEC
        lengths = args.T or (spec.tiny_lengths if args.tiny else spec.lengths)
        rows = benchmark(spec, lengths, device, dtype, 2 if args.tiny else args.reps)
        texts.append(print_table(rows, ceilings, f"== {op} on {gpu}, {spec.input_dtype or dtype}", baseline_impl=spec.baseline))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
