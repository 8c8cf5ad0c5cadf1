"""Fused normalisation kernels on a GPU at the GDN-H1 layer's sizes (65k tokens): bf16 inputs against the float64
torch formulas (reference.py) on the same GPU through kernel_checks.compare_with_reference (outputs poisoned; values
and every gradient within 1e-2 relative error), with the default TUNING (thousands of row blocks per program run).
"""
from __future__ import annotations

import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.kernels.norm import l2_norm, l2_norm_reference, rms_norm, rms_norm_reference

pytestmark = pytest.mark.gpu
TOL = 1e-2
T = 65536


def randn(*shape, seed, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, device="cuda")).bfloat16()


def gated(norm):
    """The gate as Gated DeltaNet's z: the second half of a [T, 2 * H * D] projection output, viewed [T, H, D]."""
    def run(x, weight, vz):
        T_, H, D = x.shape
        return norm(x, weight, 1e-6, gate=vz.view(T_, 2, H, D)[:, 1])
    return run


@pytest.mark.parametrize("D", [128, 256])
def test_gated_rms_norm_gdn_output(D):
    H = 24 * 128 // D
    inputs = {"x": randn(T, H, D, seed=0, scale=0.3), "weight": 1 + randn(D, seed=1, scale=0.1),
              "vz": randn(T, 2 * H * D, seed=2, scale=2.0)}
    print(compare_with_reference(gated(rms_norm), gated(rms_norm_reference), inputs, TOL))


def test_rms_norm_hidden():
    """The pre-norm blocks' RMSNorm over a 2048-wide hidden vector."""
    inputs = {"x": randn(1, T, 2048, seed=3, scale=5.0), "weight": 1 + randn(2048, seed=4, scale=0.1)}
    print(compare_with_reference(lambda x, weight: rms_norm(x, weight, 1e-6),
                                 lambda x, weight: rms_norm_reference(x, weight, 1e-6), inputs, TOL))


def test_l2_norm_qk():
    """q and k (12 heads of 128) as halves of one conv output row, as the layer feeds them."""
    qk = randn(1, T, 2, 12, 128, seed=5)
    print(compare_with_reference(lambda qk: [l2_norm(qk[:, :, 0]), l2_norm(qk[:, :, 1])],
                                 lambda qk: [l2_norm_reference(qk[:, :, 0], 1e-6), l2_norm_reference(qk[:, :, 1], 1e-6)],
                                 {"qk": qk}, TOL))


def test_dweight_deterministic():
    """The weight's gradient is summed from per-program partials in a fixed order: bitwise equal across runs."""
    x, gate = randn(T, 24, 128, seed=6), randn(T, 24, 128, seed=7)
    weight = torch.ones(128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = randn(T, 24, 128, seed=8)
    grads = [torch.autograd.grad(rms_norm(x, weight, 1e-6, gate=gate), weight, dy)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
