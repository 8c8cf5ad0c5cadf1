"""Fused normalisation kernels (kernels/norm) on CPU: the Triton kernels under the interpreter against the float64
torch formulas of reference.py through kernel_checks.compare_with_reference (outputs poisoned; values and the
gradients of x, gate and weight), the modules' Triton paths against their torch paths, input checks, and the
benchmark's CPU dry run.

A small TUNING (blocks of a few rows, at most 3 programs) makes every case walk several blocks per program, end on a
partial block and leave rows past the end in the last program, as long inputs do on a GPU.
"""
from __future__ import annotations


import pytest
import torch

import lctrain.kernels.norm.fused as norm_fused
from kernel_checks import compare_with_reference
from lctrain.kernels.norm import l2_norm, l2_norm_reference, rms_norm, rms_norm_reference
from lctrain.model.norm import GatedRMSNorm, RMSNorm

EPS = 1e-5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(norm_fused, "TUNING", {"block_elements": 2048, "max_programs": 3})


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gated(norm):
    """A gate cut from a projection output twice as wide ([..., H, 2D] -> the second half of each head's row): a
    strided view, as Gated DeltaNet's z."""
    def run(x, weight, wide_gate):
        return norm(x, weight, EPS, gate=wide_gate[..., x.shape[-1]:])
    return run


@pytest.mark.parametrize("shape, with_gate, with_weight", [
    ((2, 37, 3, 64), True, True),     # 222 rows, blocks of 32
    ((1, 45, 2, 96), False, True),    # D not a power of two
    ((1, 50, 2, 128), True, False),   # gate without weight
    ((70, 128), False, True),         # 2-D input
])
def test_rms_norm_matches_reference(shape, with_gate, with_weight):
    D = shape[-1]
    inputs = {"x": randn(*shape) * 3, "weight": randn(D, seed=1) if with_weight else None}
    if with_gate:
        inputs["wide_gate"] = randn(*shape[:-1], 2 * D, seed=2) * 2
        fast, reference = gated(rms_norm), gated(rms_norm_reference)
    else:
        fast = lambda x, weight: rms_norm(x, weight, EPS)  # noqa: E731
        reference = lambda x, weight: rms_norm_reference(x, weight, EPS)  # noqa: E731
    compare_with_reference(fast, reference, inputs, 1e-5)


@pytest.mark.parametrize("D", [64, 96])
def test_l2_norm_matches_reference(D):
    x = randn(1, 53, 3, 2 * D) * 2  # q and k as halves of one tensor: strided views
    compare_with_reference(lambda x: [l2_norm(x[..., :D]), l2_norm(x[..., D:])],
                           lambda x: [l2_norm_reference(x[..., :D], 1e-6), l2_norm_reference(x[..., D:], 1e-6)],
                           {"x": x}, 1e-5)


def test_gated_rms_norm_float16():
    """float16 x and gate with a float32 weight (mixed, as outside DeepSpeed's bf16 engine); outputs in float16."""
    inputs = {"x": randn(1, 40, 2, 64, dtype=torch.float16), "weight": randn(64, seed=1),
              "wide_gate": randn(1, 40, 2, 128, seed=2, dtype=torch.float16)}
    compare_with_reference(gated(rms_norm), gated(rms_norm_reference), inputs, 2e-3)
    assert gated(rms_norm)(**inputs).dtype == torch.float16


@pytest.mark.parametrize("gate", [False, True])
def test_modules_triton_path_equals_torch_path(monkeypatch, gate):
    """RMSNorm and GatedRMSNorm: the same outputs and gradients (x, gate, weight) with and without Triton."""
    module = GatedRMSNorm(32, EPS) if gate else RMSNorm(32, EPS)
    with torch.no_grad():
        module.weight.copy_(randn(32, seed=3))
    x, z, dy = randn(2, 19, 2, 32), randn(2, 19, 2, 32, seed=1), randn(2, 19, 2, 32, seed=2)
    results = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        module.zero_grad()
        leaves = [x.clone().requires_grad_(), z.clone().requires_grad_()]
        y = module(*leaves) if gate else module(leaves[0])
        y.backward(dy)
        results.append([y, leaves[0].grad, module.weight.grad] + ([leaves[1].grad] if gate else []))
    triton_path, torch_path = results
    assert triton_path[0].grad_fn.name() == "NormFunctionBackward" != torch_path[0].grad_fn.name()
    for a, b in zip(triton_path, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_l2_norm_triton_path_equals_torch_path(monkeypatch):
    """Gated DeltaNet's q/k normalisation (l2_norm) with and without Triton."""
    x = randn(1, 30, 2, 16)
    results = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        leaf = x.clone().requires_grad_()
        y = l2_norm(leaf)
        y.backward(randn(1, 30, 2, 16, seed=1))
        results.append((y, leaf.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: rms_norm(randn(4, 8).double(), None), "x must be float32"),
    (lambda: rms_norm(randn(4, 8), randn(7)), r"weight must be \[D=8\]"),
    (lambda: rms_norm(randn(4, 8), randn(8), gate=randn(4, 9)), "gate must have x's shape"),
    (lambda: rms_norm(randn(2, 20000), None), "1 <= D <= 16384"),
    (lambda: l2_norm(randn(4, 8), eps=0.0), "eps must be > 0"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
