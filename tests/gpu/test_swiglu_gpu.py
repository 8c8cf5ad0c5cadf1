"""The fused SwiGLU activation on a GPU at the 1.3B configs' MLP size (65k tokens, ffn 5632): bf16 against the float64
torch formula (reference.py) on the same GPU through kernel_checks.compare_with_reference (outputs poisoned; h and
d(gate_up) within 1e-2 relative error) with the default TUNING; float32 and float16 on a strided view.
"""
from __future__ import annotations

import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.kernels.swiglu import swiglu, swiglu_reference

pytestmark = pytest.mark.gpu
T, F = 65536, 5632


def randn(*shape, seed, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (2 * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)


def test_bf16_mlp_activation():
    gate_up = randn(T, 2 * F, seed=0, dtype=torch.bfloat16)
    assert swiglu(gate_up.detach().requires_grad_()).grad_fn.name() == "SwiGLUFunctionBackward"
    print(compare_with_reference(swiglu, swiglu_reference, {"gate_up": gate_up}, 1e-2))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_strided_view(dtype, tol):
    """gate_up as columns of a wider [B, T, 2F + 64] tensor (a tensor-parallel-like F = 2816): read in place."""
    half = F // 2

    def run(op):
        return lambda wide: op(wide[..., 32:32 + 2 * half])

    print(compare_with_reference(run(swiglu), run(swiglu_reference),
                                 {"wide": randn(2, 4099, 2 * half + 64, seed=1, dtype=dtype)}, tol))
