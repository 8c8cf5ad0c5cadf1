"""Gated Slot Attention: lctrain's chunk_gsa against flash-linear-attention's fla.ops.gsa.chunk_gsa (the baseline).

Shape: the GSA paper's 1.3B layer, B = 1, H = 4, K = V = 512, M = 64 slots, bf16; the layer's gates
g = logsigmoid(x) / 8 (damping) and slot writes s = 1 - exp(g). On CPU (--tiny) H = 1, K = V = 32, M = 16.

Cost model, per token and head, from the chunkwise math with chunks of C = 64 and causal halves counted once:
    key pass   state read 2KM + intra q.k 2K(C/2) + intra A.s 2(C/2)M + state update 2KM
    value pass state read 2MV + intra p.s 2M(C/2) + intra A.v 2(C/2)V + state update 2MV
    backward = 2 x forward (three output-sized products per pass: dq, dk, dv, each the size of the forward's).
Fewest bytes: forward reads q, k, v, s, g and writes o; backward reads them and do, writes dq, dk, dv, ds, dg
(all in the inputs' dtype; states and scores never need to leave the chip in the ideal kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LENGTHS, Impl, OpSpec, fla_impl

GPU_DIMS = (4, 512, 512, 64)  # H, K, V, M
CPU_DIMS = (1, 32, 32, 16)
CHUNK = 64


def _dims(device: torch.device):
    return GPU_DIMS if device.type == "cuda" else CPU_DIMS


def make_inputs(T: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    H, K, V, M = _dims(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    g = F.logsigmoid(randn(1, T, H, M)) / 8
    inputs = {"q": randn(1, T, H, K), "k": randn(1, T, H, K), "v": randn(1, T, H, V), "s": 1 - g.exp(), "g": g}
    return {name: t.to(dtype).requires_grad_() for name, t in inputs.items()}


def cost(T: int) -> tuple[float, float, float, float]:
    H, K, V, M = GPU_DIMS
    half = CHUNK / 2
    key_pass = 2 * K * M + 2 * K * half + 2 * half * M + 2 * K * M
    value_pass = 2 * M * V + 2 * M * half + 2 * half * V + 2 * M * V
    fwd_flops = T * H * (key_pass + value_pass)
    elem = 2  # bf16
    inputs = T * H * (2 * K + V + 2 * M) * elem
    out = T * H * V * elem
    return fwd_flops, inputs + out, 2 * fwd_flops, inputs + out + inputs


def _lctrain() -> Impl:
    from lctrain.kernels.gsa import chunk_gsa

    return Impl("lctrain", lambda x: chunk_gsa(x["q"], x["k"], x["v"], x["s"], x["g"])[0])


def _fla() -> Impl:
    return fla_impl("fla.ops.gsa", "chunk_gsa", lambda f, x: f(x["q"], x["k"], x["v"], x["s"], x["g"])[0])


SPEC = OpSpec(
    name="gsa",
    tiny_lengths=[20],
    make_inputs=make_inputs,
    cost=cost,
    impls=lambda: [_lctrain(), _fla()],
    baseline="fla",
)


# Settings of kernels/gsa/chunk.py timed against the defaults at the last length by profile().
VARIANTS = {
    "recompute states": {"KEEP_FORWARD_STATES": False},
    "every chunk deferred to the sub-block launch": {"GAP_LIMIT": -1.0},
    "value-pass scans carry S^T (units, states)": {"KEY_GATE_SCAN_TRANSPOSED": frozenset({"units", "states"})},
    "value-pass scans carry S^T (units, states, pair)":
        {"KEY_GATE_SCAN_TRANSPOSED": frozenset({"units", "states", "pair"})},
}
# One fwd+bwd's _state_scan_kernel calls in launch order (the defaults keep the forward's states): forward key pass
# (units, states), value pass (units, states); backward value pass (units, pair), key pass (units, pair).
SCAN_KERNEL = "_state_scan_kernel"


def scan_times_us(fwd_bwd) -> list[float]:
    """CUDA time of each _state_scan_kernel launch of one fwd_bwd(0) call, in launch order (us)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd_bwd(0)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith(SCAN_KERNEL)]
    return [e.time_range.elapsed_us() for e in sorted(kernels, key=lambda e: e.time_range.start)]


def profile(lengths=LENGTHS) -> None:
    """lctrain alone (no peer to compile or autotune): fwd and fwd+bwd at each length, the VARIANTS at the last
    length, then a per-kernel CUDA time table of one fwd+bwd at the last length.
    Run from benchmarks/:  python -m kernel_ops.gsa [T ...]"""
    from harness import step_functions, time_ms

    import lctrain.kernels.gsa.chunk as gsa_chunk

    device, dtype = torch.device("cuda"), torch.bfloat16
    lct = _lctrain()
    print(f"lctrain chunk_gsa on {torch.cuda.get_device_name()}: T, fwd ms, fwd+bwd ms", flush=True)
    for T in lengths:
        fwd, fwd_bwd = step_functions(lct.forward, [make_inputs(T, seed, device, dtype) for seed in range(3)])
        print(f"  {T:>7} {time_ms(fwd, rotate=3):9.3f} {time_ms(fwd_bwd, rotate=3):9.3f}", flush=True)
    def scans(name):
        print(f"  {T:>7} scans, us: {' '.join(f'{t:.0f}' for t in scan_times_us(fwd_bwd))}  ({name})", flush=True)

    scans("defaults")
    for name, settings in VARIANTS.items():
        saved = {key: getattr(gsa_chunk, key) for key in settings}
        for key, value in settings.items():
            setattr(gsa_chunk, key, value)
        try:
            print(f"  {T:>7} {time_ms(fwd, rotate=3):9.3f} {time_ms(fwd_bwd, rotate=3):9.3f}  ({name})", flush=True)
            scans(name)
        finally:
            for key, value in saved.items():
                setattr(gsa_chunk, key, value)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd_bwd(0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=48))


if __name__ == "__main__":
    import sys

    profile(tuple(int(t) for t in sys.argv[1:]) or LENGTHS)
