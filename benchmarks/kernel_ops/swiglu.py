"""SwiGLU's activation h = silu(g) * u over the fused gate/up projection output [T, 2F] (g, u its halves). lctrain's
fused kernel (``lctrain.kernels.swiglu.swiglu``) against the torch formula the MLP ran before it (chunk, F.silu and a
product in bf16: the baseline) and flash-linear-attention's ``fla.modules.activations.swiglu(x, y)`` given the two
halves as views (its backward returns dx and dy separately; autograd's chunk backward joins them).

Shape: gate_up [T, 2F] bf16 with F = 5632 (the 1.3B configs' ffn). On CPU (--tiny) F = 24, float32.

Cost model per element of h (N = T F; the op is memory-bound, flops only fill the table): forward sigmoid (exp, add,
divide), g s, the product with u: 5; backward the sigmoid again (3), silu'(g) = s (1 + g (1 - s)) (4), dh u and its
product (2), du = dh g s (2): 11. Fewest bytes: forward reads g and u, writes h (3 x 2 bytes per element); backward
reads g, u and dh, writes dg and du (5 x 2 bytes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Impl, OpSpec, fla_impl

GPU_FFN = 5632
CPU_FFN = 24


def _ffn(device: torch.device) -> int:
    return GPU_FFN if device.type == "cuda" else CPU_FFN


def make_inputs(T: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    gate_up = torch.randn(T, 2 * _ffn(device), generator=gen, device=device).to(dtype)
    return {"gate_up": gate_up.requires_grad_()}


def cost(T: int) -> tuple[float, float, float, float]:
    elements, elem = T * GPU_FFN, 2  # bf16
    return 5 * elements, 3 * elem * elements, 11 * elements, 5 * elem * elements


def _lctrain() -> Impl:
    from lctrain.kernels.swiglu import swiglu

    return Impl("lctrain", lambda x: swiglu(x["gate_up"]))


def _torch_formula(x: dict) -> torch.Tensor:
    gate, up = x["gate_up"].chunk(2, dim=-1)
    return F.silu(gate) * up


def _fla() -> Impl:
    return fla_impl("fla.modules.activations", "swiglu", lambda f, x: f(*x["gate_up"].chunk(2, dim=-1)))


SPEC = OpSpec(
    name="swiglu",
    make_inputs=make_inputs,
    cost=cost,
    impls=lambda: [_lctrain(), Impl("torch", _torch_formula), _fla()],
    baseline="torch",
)


VARIANTS = [  # overrides of lctrain.kernels.swiglu.fused.TUNING, for a GPU session's sweep
    {"elements": 2048}, {"elements": 8192}, {"elements": 8192, "warps": 8}, {"max_columns": 256},
    {"fit_columns": False}]


def profile(T: int = 65536) -> None:
    """lctrain's fwd and fwd+bwd at T for the default TUNING and each VARIANT, each line printed as measured (a GPU
    session's sweep). Run from benchmarks/:  python -m kernel_ops.swiglu [T]"""
    from harness import tuning_sweep

    import lctrain.kernels.swiglu.fused as fused

    tuning_sweep(fused, VARIANTS, _lctrain().forward, make_inputs, T, "swiglu")


if __name__ == "__main__":
    import sys

    profile(*(int(a) for a in sys.argv[1:2]))
