"""The fused RoPE on a GPU at the GDN-H1 sliding-window attention's size (65k tokens, 16 heads x 128, full rotation):
bf16 against the float64 torch formula (reference.py) through kernel_checks.compare_with_reference (outputs poisoned;
y and dx within 1e-2 relative error) with the default TUNING, q read in place as half of a fused projection's output;
float32 at 131k positions (libdevice's slow range reduction for large angles) against the float32 torch path.
"""
from __future__ import annotations

import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.kernels.rope import rope, rope_reference

pytestmark = pytest.mark.gpu
THETA = 10000.0


def randn(*shape, seed, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


def test_bf16_attention_heads():
    T, H, D = 65536, 16, 128
    positions = torch.cat([torch.arange(5000), torch.arange(T - 5000)]).cuda()[None]  # two documents

    def run(op):  # q as the second half of a [1, T, 2 H D] projection output, viewed as heads (row stride 2 H D)
        return lambda qk, positions: op(qk.chunk(2, -1)[1].view(1, T, H, D), positions, D, THETA)

    print(compare_with_reference(run(rope), run(rope_reference),
                                 {"qk": randn(1, T, 2 * H * D, seed=0, dtype=torch.bfloat16), "positions": positions},
                                 1e-2, grad_names=["qk"]))


def test_long_positions_match_the_float32_path():
    T, H, D = 131072, 2, 64
    x = randn(T, H, D, seed=1, dtype=torch.float32).requires_grad_()
    positions = torch.arange(T, device="cuda")
    y = rope(x, positions, D, THETA)
    expected = rope_reference(x, positions, D, THETA)
    torch.testing.assert_close(y, expected, rtol=0, atol=2e-5)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(expected, x, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=2e-5)
