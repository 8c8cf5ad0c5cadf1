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

from . import Impl, OpSpec

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
    if not torch.cuda.is_available():
        return Impl("fla", lambda x: None, unavailable="fla's kernels need a CUDA GPU")
    try:
        from fla.modules.fused_norm_gate import rms_norm_gated
    except Exception as error:  # noqa: BLE001 - any import failure makes the peer unavailable, with its reason
        return Impl("fla", lambda x: None, unavailable=f"fla import failed: {type(error).__name__}: {error}")
    return Impl("fla", lambda x: rms_norm_gated(x["x"], x["gate"], x["weight"], None, activation="swish", eps=EPS))


SPEC = OpSpec(
    name="norms",
    lengths=[8192, 32768, 65536, 131072],
    tiny_lengths=[20, 70],
    make_inputs=make_inputs,
    cost=cost,
    impls=lambda: [_lctrain(), _torch(), _fla()],
    baseline="torch",
)
