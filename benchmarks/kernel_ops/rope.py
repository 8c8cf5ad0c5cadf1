"""Rotary position embedding on sliding-window attention's q or k: lctrain's fused kernel
(``lctrain.kernels.rope.rope``) against the float32 torch formula the attention layer ran before it
(``rope_reference``: ~10 elementwise passes and concatenations, the baseline). No peer: fla's rotary kernel takes
precomputed [T, rot_dim/2] cos/sin tables, a different interface.

Shape: x [T, H = 16, D = 128] bf16 with rot_dim = D, theta 1e4 (configs/gdn_h1_1p3b.yaml's attention: 16 heads of
128, rope_fraction 1), positions of one document 0 .. T-1. On CPU (--tiny) H = 2, D = 32, rot_dim = 16, float32.

Cost model per element (memory-bound; flops only fill the table): 2 products and a sum per rotated element (3), the
same in the backward; cos and sin per (token, pair) are 1/H of that and left out. Fewest bytes: each direction reads
x (dy) and writes y (dx): 2 x 2 bytes per element, plus the int64 positions (8 bytes per token).
"""
from __future__ import annotations

import torch

from . import Impl, OpSpec

GPU_SHAPE = (16, 128, 128)  # H, D, rot_dim
CPU_SHAPE = (2, 32, 16)
THETA = 10000.0


def _shape(device: torch.device) -> tuple[int, int, int]:
    return GPU_SHAPE if device.type == "cuda" else CPU_SHAPE


def make_inputs(T: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    H, D, _ = _shape(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, D, generator=gen, device=device).to(dtype)
    return {"x": x.requires_grad_(), "positions": torch.arange(T, device=device)}


def cost(T: int) -> tuple[float, float, float, float]:
    H, D, _ = GPU_SHAPE
    elements, elem = T * H * D, 2  # bf16
    nbytes = 2 * elem * elements + 8 * T
    return 3 * elements, nbytes, 3 * elements, nbytes


def _impl(name: str, op) -> Impl:
    def forward(x: dict) -> torch.Tensor:
        return op(x["x"], x["positions"], _shape(x["x"].device)[2], THETA)

    return Impl(name, forward)


def _impls() -> list[Impl]:
    from lctrain.kernels.rope import rope, rope_reference

    return [_impl("lctrain", rope), _impl("torch", rope_reference)]


SPEC = OpSpec(name="rope", make_inputs=make_inputs, cost=cost, impls=_impls, baseline="torch")


VARIANTS = [{"warps": 4}, {"elements": 2048, "warps": 4}, {"elements": 2048}, {"elements": 8192},
            {"elements": 1024, "warps": 4}]  # overrides of lctrain.kernels.rope.fused.TUNING, for a GPU sweep


def profile(T: int = 65536) -> None:
    """lctrain's fwd and fwd+bwd at T for the default TUNING and each VARIANT, each line printed as measured (a GPU
    session's sweep). Run from benchmarks/:  python -m kernel_ops.rope [T]"""
    from harness import tuning_sweep

    import lctrain.kernels.rope.fused as fused

    tuning_sweep(fused, VARIANTS, _impls()[0].forward, make_inputs, T, "rope")


if __name__ == "__main__":
    import sys

    profile(*(int(a) for a in sys.argv[1:2]))
