"""Gated DeltaNet: lctrain's chunk_gated_delta_rule against flash-linear-attention's (the baseline), with causal
flash attention (torch SDPA, q, k, v [B, H, T, D]) as a reference point.

Shape: B = 1, H = 16 (query/key and value heads), K = V = 128, bf16; unit-norm keys, beta = sigmoid, log decays
g = logsigmoid (float32), as the layer feeds them. On CPU (--tiny) H = 2, K = V = 32.

Cost model, per token and head, chunks of C = 64, causal C x C products counted at half:
  forward  UT transform: k k^T (K C) and the triangular solve for [w | u] (C (K + V));
           pseudo-values u - w h (2 K V); state update (2 K V); output (q e) h (2 K V) + q k^T (K C) + P vn (V C)
  backward dh recurrence (4 K V: q^T do, w^T dvn) + dvn (2 K V + V C); dq (2 K V + K C); dk (2 K V + K C);
           dw (2 K V); dS = vn do^T (V C); UT transform: T^T du, T^T dw, dT, dA and k k^T (~3 C (K + V));
           the kernels' recomputation of the forward is not counted.
  attention (SDPA): forward 2 T K + 2 T V per token and head at half (causal), backward 2.5 x forward.
Fewest bytes: forward reads q, k, v, g (float32), beta and writes o; backward also reads do and writes dq, dk,
dv, dg, dbeta, in the inputs' dtypes (states never need to leave the chip in the ideal kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LENGTHS, Impl, OpSpec, fla_impl

GPU_DIMS = (16, 128, 128)  # H, K, V
CPU_DIMS = (2, 32, 32)
CHUNK = 64


def _dims(device: torch.device):
    return GPU_DIMS if device.type == "cuda" else CPU_DIMS


def make_inputs(T: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    H, K, V = _dims(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    inputs = {
        "q": randn(1, T, H, K).to(dtype),
        "k": F.normalize(randn(1, T, H, K), dim=-1).to(dtype),
        "v": randn(1, T, H, V).to(dtype),
        "g": F.logsigmoid(randn(1, T, H) + 3.0),
        "beta": randn(1, T, H).sigmoid().to(dtype),
    }
    return {name: t.requires_grad_() for name, t in inputs.items()}


def cost(T: int) -> tuple[float, float, float, float]:
    H, K, V = GPU_DIMS
    C = CHUNK
    fwd = K * C + C * (K + V) + 3 * 2 * K * V + K * C + V * C
    bwd = 4 * K * V + 2 * K * V + V * C + 2 * K * V + K * C + 2 * K * V + K * C + 2 * K * V + V * C + 3 * C * (K + V)
    elem = 2  # bf16
    per_token = H * (2 * K + V) * elem + H * (4 + elem)  # q, k, v, g (float32), beta
    out = H * V * elem
    fwd_bytes = T * (per_token + out)
    bwd_bytes = T * (per_token + out + per_token)  # reads again with do; writes every input's gradient
    return T * H * fwd, fwd_bytes, T * H * bwd, bwd_bytes


def _lctrain() -> Impl:
    from lctrain.kernels.gated_delta import chunk_gated_delta_rule

    return Impl("lctrain", lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])[0])


def _fla() -> Impl:
    return fla_impl("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", lambda f, x: f(x["q"], x["k"], x["v"], x["g"], x["beta"])[0])


def attention_cost(T: int) -> tuple[float, float, float, float]:
    """Causal attention: q k^T and p v at half; backward 2.5 x forward (dv, dp, dq, dk and the recomputed scores).
    Bytes: q, k, v in and o out; backward reads them with do and writes dq, dk, dv."""
    H, K, V = GPU_DIMS
    fwd = T * H * (T / 2) * (2 * K + 2 * V)
    io = T * H * (2 * K + 2 * V) * 2
    return fwd, io, 2.5 * fwd, io + T * H * (2 * K + V + V) * 2


def _attention() -> Impl:
    """Causal flash attention on the same q, k, v (a reference point, not a peer: it ignores g and beta)."""
    def forward(x):
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    return Impl("sdpa-causal", forward, cost=attention_cost)


SPEC = OpSpec(
    name="gdn",
    make_inputs=make_inputs,
    cost=cost,
    impls=lambda: [_lctrain(), _fla(), _attention()],
    baseline="fla",
)


VARIANTS = [  # (label, TUNING overrides, module switches, chunks per segment): runtime knobs of chunk.py
    ("segments of 32 chunks", {}, {}, 32),
    ("segments of 128 chunks", {}, {}, 128),
    ("folds 64 cols, 8 warps (v5)", {"combine": (64, 8, 1)}, {}, None),
    ("local dvn 64 cols, 4 warps (v5)", {"local_dvn": (64, 4, 1)}, {}, None),
    ("forward scans 2 stages (v5)", {"summary": (32, 4, 2), "states": (32, 4, 2)}, {}, None),
    ("gradient scans 64 cols, 8 warps", {"grad_summary": (64, 8, 2), "grad_scan": (64, 8, 2)}, {}, None),
    ("recompute forward states", {}, {"KEEP_FORWARD_STATES": False}, None),
    # v7 candidate: _grads_qk and _grads_wy as one launch (sm_90 compile: 235 registers, no spills, 72 KB shared
    # at 64 columns / 8 warps / 2 stages; 228 registers at 1 stage; NOTES.md)
    ("fused gradient kernel (v7)", {}, {"FUSED_GRADS": True}, None),
    ("fused gradient kernel, 1 stage", {"grads_fused": (64, 8, 1)}, {"FUSED_GRADS": True}, None),
]


def profile(lengths=LENGTHS, sweep_T: int = 65536, fla_T: int = 65536, with_fla: bool = True,
            variant_filter: str = "") -> None:
    """For a GPU session: lctrain's fwd and fwd+bwd at each length; at sweep_T a per-kernel CUDA time table;
    lctrain against fla at T = 8192 (relative difference of values and gradients) and fla's times at fla_T; then
    the VARIANTS whose label contains variant_filter at sweep_T, each with its own per-kernel table (each compiles
    its kernels once). Each line is printed as soon as it is measured.
    Run from benchmarks/:  python -m kernel_ops.gdn [lengths...]   or, the defaults against chosen variants only
    (no lengths, no fla):  python -m kernel_ops.gdn --variants fused"""
    import os

    from harness import step_functions, time_ms

    import lctrain.kernels.gated_delta.chunk as chunk

    device, dtype = torch.device("cuda"), torch.bfloat16
    names = ["q", "k", "v", "g", "beta"]
    print(f"on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}", flush=True)

    def timings(impl, T):
        fwd, fwd_bwd = step_functions(impl.forward, [make_inputs(T, seed, device, dtype) for seed in range(3)])
        return time_ms(fwd, rotate=3), time_ms(fwd_bwd, rotate=3), fwd_bwd

    def kernel_table(label, fwd_bwd):
        fwd_bwd(0)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd_bwd(0)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        for event in events[:16]:
            print(f"  [{label}] kernel {event.key[:40]:40s} calls {event.count:3d} total "
                  f"{event.device_time_total / 1e3:8.3f} ms", flush=True)
        grads = sum(e.device_time_total for e in events if e.key.startswith("_grads")) / 1e3
        print(f"  [{label}] gradient kernels (_grads*) {grads:.3f} ms", flush=True)

    lct = _lctrain()
    for T in lengths:
        f, fb, _ = timings(lct, T)
        print(f"  lctrain T={T}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    f, fb, fwd_bwd = timings(lct, sweep_T)
    print(f"  defaults T={sweep_T}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    kernel_table("defaults", fwd_bwd)
    fla = _fla() if with_fla else None
    if fla is not None and fla.unavailable is not None:
        print("  fla:", fla.unavailable, flush=True)
    elif fla is not None:
        x = make_inputs(8192, 7, device, dtype)
        cot = torch.randn_like(x["v"])
        results = []
        for impl in (lct, fla):
            o = impl.forward(x)
            results.append([o, *torch.autograd.grad(o, [x[n] for n in names], cot)])
        diffs = {n: ((a.float() - b.float()).norm() / b.float().norm()).item()
                 for n, a, b in zip(["o"] + [f"d{n}" for n in names], *results)}
        print("  lctrain vs fla at T=8192, relative difference:", {k: f"{v:.2e}" for k, v in diffs.items()},
              flush=True)
        f, fb, _ = timings(fla, fla_T)
        print(f"  fla T={fla_T}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    defaults = dict(chunk.TUNING)
    for label, overrides, switches, segment in VARIANTS:
        if variant_filter not in label:
            continue
        saved = {name: getattr(chunk, name) for name in switches}
        chunk.TUNING.update(overrides)
        for name, value in switches.items():
            setattr(chunk, name, value)
        if segment:
            os.environ["LCTRAIN_GDN_SEGMENT_CHUNKS"] = str(segment)
        f, fb, fwd_bwd = timings(lct, sweep_T)
        print(f"  variant T={sweep_T} {label}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
        kernel_table(label, fwd_bwd)
        chunk.TUNING.update(defaults)
        for name, value in saved.items():
            setattr(chunk, name, value)
        os.environ.pop("LCTRAIN_GDN_SEGMENT_CHUNKS", None)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--variants"]:
        profile(lengths=(), with_fla=False, variant_filter=sys.argv[2] if len(sys.argv) > 2 else "")
    else:
        profile(*([int(a) for a in sys.argv[1:]],) if len(sys.argv) > 1 else ())
