"""Gated RMSNorm, Gated DeltaNet's output norm: y = RMSNorm(x) * silu(gate) per head. lctrain's fused kernel
(``lctrain.kernels.norm.rms_norm``) against the float32 torch formula the layer ran before it (the baseline) and
flash-linear-attention's fused norm-gate kernel (``fla.modules.fused_norm_gate.rms_norm_gated``, swish gate).

Shape: x, gate [T, H = 24 value heads, D = 128] bf16 (GDN-H1 1.3B's value heads), weight [D]; eps 1e-6.
On CPU (--tiny) H = 2, D = 32, float32.

Cost model per element (the op is memory-bound; flops only fill the table): forward x^2 and its row sum, x r, * w,
sigmoid (exp, add, divide), g sigmoid(g), the product: 9; backward recomputes x r and sigmoid (6), dgate (7),
the gate's and weight's products into u and the dweight sum (5), sum(u x^) and dx (5): 23.
Fewest bytes: forward reads x and gate, writes y (3 x 2 bytes per element); backward reads x, gate and dy, writes
dx and dgate (5 x 2 bytes); the weight and its gradient are negligible.
"""
from __future__ import annotations

import torch

from . import Impl, OpSpec, fla_impl

GPU_DIMS = (24, 128)  # H, D
CPU_DIMS = (2, 32)
EPS = 1e-6


def _dims(device: torch.device):
    return GPU_DIMS if device.type == "cuda" else CPU_DIMS


def make_inputs(T: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    H, D = _dims(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = {"x": torch.randn(T, H, D, generator=gen, device=device).to(dtype),
              "gate": torch.randn(T, H, D, generator=gen, device=device).to(dtype),
              "weight": (1 + 0.1 * torch.randn(D, generator=gen, device=device)).to(dtype)}
    return {name: t.requires_grad_() for name, t in inputs.items()}


def cost(T: int) -> tuple[float, float, float, float]:
    H, D = GPU_DIMS
    elements, elem = T * H * D, 2  # bf16
    return 9 * elements, 3 * elem * elements, 23 * elements, 5 * elem * elements


def _lctrain() -> Impl:
    from lctrain.kernels.norm import rms_norm

    return Impl("lctrain", lambda x: rms_norm(x["x"], x["weight"], EPS, gate=x["gate"]))


def _torch() -> Impl:
    """The layer's torch path: F.rms_norm and SiLU in float32, cast back (several passes)."""
    from lctrain.kernels.norm import rms_norm_reference

    return Impl("torch", lambda x: rms_norm_reference(x["x"], x["weight"], EPS, x["gate"]))


def _fla() -> Impl:
    return fla_impl("fla.modules.fused_norm_gate", "rms_norm_gated",
                    lambda f, x: f(x["x"], x["gate"], x["weight"], None, activation="swish", eps=EPS))


SPEC = OpSpec(
    name="norms",
    make_inputs=make_inputs,
    cost=cost,
    impls=lambda: [_lctrain(), _torch(), _fla()],
    baseline="torch",
)


VARIANTS = [  # overrides of lctrain.kernels.norm.fused.TUNING, for a GPU session's sweep
    {"block_elements": 2048}, {"block_elements": 8192}, {"max_programs": 1024}, {"max_programs": 8192}]
QK_HEADS = 12  # GDN-H1's query/key heads (x 128)


def profile(T: int = 65536) -> None:
    """For a GPU session, each line printed as soon as measured: the gated norm's fwd and fwd+bwd at T for the
    default TUNING and each VARIANT; then the L2 norm of q ([T, 12, 128] bf16; k is the same again) for lctrain,
    the torch path and fla's l2norm. Run from benchmarks/:  python -m kernel_ops.norms [T]"""
    from harness import step_functions, time_ms

    import lctrain.kernels.norm.fused as fused
    from lctrain.kernels.norm import l2_norm, l2_norm_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a dry run of the script
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"on {name}, torch {torch.__version__}, triton {__import__('triton').__version__}", flush=True)

    def timings(forward, sets):
        fwd, fwd_bwd = step_functions(forward, sets)
        return time_ms(fwd, rotate=len(sets)), time_ms(fwd_bwd, rotate=len(sets))

    sets = [make_inputs(T, seed, device, dtype) for seed in range(3)]
    lctrain = _lctrain().forward
    defaults = dict(fused.TUNING)
    for overrides in [{}] + VARIANTS:
        fused.TUNING.update(overrides)
        f, fb = timings(lctrain, sets)
        print(f"  gated norm T={T} TUNING {dict(fused.TUNING)}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
        fused.TUNING.update(defaults)
    del sets

    try:
        from fla.modules.l2norm import l2norm as fla_l2norm
    except Exception as error:  # noqa: BLE001 - the peer is optional here
        fla_l2norm = None
        print(f"  fla l2norm unavailable: {type(error).__name__}: {error}", flush=True)
    H, D = QK_HEADS, _dims(device)[1]
    qk_sets = [{"x": torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True)} for _ in range(3)]
    impls = {"lctrain": lambda x: l2_norm(x["x"], EPS), "torch": lambda x: l2_norm_reference(x["x"], EPS)}
    if fla_l2norm is not None and device.type == "cuda":
        impls["fla"] = lambda x: fla_l2norm(x["x"], EPS)
    for name, forward in impls.items():
        f, fb = timings(forward, qk_sets)
        print(f"  l2 norm of q (or k) [T={T}, {H}, {D}] {name}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms "
              f"(the layer runs it twice)", flush=True)


if __name__ == "__main__":
    import sys

    profile(*(int(a) for a in sys.argv[1:2]))
