"""The short causal conv kernels on a GPU: bf16 (and float32, float16) inputs against the float64 sum over taps
(kernels/short_conv/reference.py) run on the same GPU, through kernel_checks.compare_with_reference (outputs poisoned;
y, dx, dweight and dhalo). The GDN layer's shape at 65k tokens (C = 3072), packed documents with one-token ones, a
halo, the kernel sizes 2 and 8, strided x (a part of a wider projection), and a run-to-run identical weight gradient.
"""
from __future__ import annotations

import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.kernels.short_conv import causal_short_conv, causal_short_conv_reference

pytestmark = pytest.mark.gpu


def conv_inputs(rows, length, channels, kernel_size, dtype, seed=0, documents=16, halo=True):
    """Random x, weight; ``documents`` per row at random boundaries plus one-token documents at the row's start and
    near its end; the halo continues row 0's first document and belongs to another document on the other rows."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    inputs = {"x": torch.randn(rows, length, channels, generator=gen, device="cuda").to(dtype),
              "weight": (torch.randn(channels, kernel_size, generator=gen, device="cuda")
                         / kernel_size ** 0.5).to(dtype)}
    cuts = torch.randperm(length - 3, generator=gen, device="cuda")[: documents - 1] + 2
    starts = torch.zeros(rows, length, dtype=torch.int64, device="cuda")
    starts[:, cuts] = 1
    starts[:, [1, length - 2, length - 1]] = 1  # one-token documents: token 0 and token length - 2
    doc_ids = starts.cumsum(1) + 100 * torch.arange(rows, device="cuda")[:, None]
    inputs["doc_ids"], inputs["halo"], inputs["halo_doc_ids"] = doc_ids, None, None
    if halo:
        inputs["halo"] = torch.randn(rows, kernel_size - 1, channels, generator=gen, device="cuda").to(dtype)
        halo_doc = torch.full((rows, kernel_size - 1), -7, dtype=torch.int64, device="cuda")
        halo_doc[0] = doc_ids[0, 0]
        inputs["halo_doc_ids"] = halo_doc
    return inputs


def test_gdn_shape_65k_bf16():
    """One GDN-H1 1.3B layer's v (or q and k) at 65k tokens, bf16, within 1e-2 of float64."""
    errors = compare_with_reference(causal_short_conv, causal_short_conv_reference,
                                     conv_inputs(1, 65536, 3072, 4, torch.bfloat16) | {"activation": True}, 1e-2)
    print("bf16, T=65536, C=3072:", errors)


@pytest.mark.parametrize("rows, length, channels, kernel_size, dtype, activation, halo, tol", [
    (2, 8191, 1000, 4, torch.bfloat16, False, True, 1e-2),
    (3, 4099, 520, 2, torch.float32, True, True, 1e-5),
    (2, 4099, 520, 8, torch.float32, True, True, 1e-5),
    (1, 20000, 256, 4, torch.float16, True, False, 2e-3),
])
def test_shapes_and_dtypes(rows, length, channels, kernel_size, dtype, activation, halo, tol):
    inputs = conv_inputs(rows, length, channels, kernel_size, dtype, seed=1, halo=halo) | {"activation": activation}
    compare_with_reference(causal_short_conv, causal_short_conv_reference, inputs, tol)


def test_strided_x():
    """x as the mixers pass it: one half of a [R, N, 2C] projection (token stride 2C)."""
    def strided(x, weight, doc_ids, halo, halo_doc_ids):
        wide = torch.cat([x, torch.zeros_like(x)], -1)
        return causal_short_conv(wide[..., : x.shape[-1]], weight, doc_ids, halo, halo_doc_ids)

    compare_with_reference(strided, causal_short_conv_reference, conv_inputs(1, 32768, 1536, 4, torch.bfloat16), 1e-2)


def test_weight_gradient_is_deterministic():
    """Per-program partials summed in a fixed order: two backward passes give the same bits."""
    inputs = conv_inputs(1, 65536, 3072, 4, torch.bfloat16, seed=2)
    weight = inputs["weight"].requires_grad_()
    cotangent = torch.randn_like(inputs["x"])
    grads = [torch.autograd.grad(causal_short_conv(inputs["x"], weight, inputs["doc_ids"], inputs["halo"],
                                                   inputs["halo_doc_ids"]), weight, cotangent)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
