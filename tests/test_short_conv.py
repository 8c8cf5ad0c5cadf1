"""The short causal conv kernels on CPU: the Triton kernels under the interpreter against the float64 sum over taps
(kernels/short_conv/reference.py) through kernel_checks.compare_with_reference (outputs poisoned; y, dx, dweight and
dhalo), the reference itself against torch's conv1d run document by document, ShortConv's Triton path against its
torch path (halo from a context included), bad inputs, and the benchmark's CPU dry run.

Tiles are shrunk to 16 tokens x 16 channels with two tiles per backward program, so that rows of 37 tokens and 24
channels cover partial tiles, several tiles per program and a partial last program.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kernel_checks import compare_with_reference
from lctrain.kernels.short_conv import causal_short_conv, causal_short_conv_reference
from lctrain.kernels.short_conv import conv as short_conv_module

R, N, C = 2, 37, 24
# Row 0: documents of 5 (continuing the halo's), 1, 14, 16 and 1 tokens; row 1: a 1-token document at token 0 after a
# halo of other documents, then one document to the end.
DOC_IDS = torch.tensor([[0] * 5 + [1] + [2] * 14 + [3] * 16 + [4], [9] + [10] * 36])
HALO_DOC_IDS = {4: torch.tensor([[0, 0, 0], [4, 5, 5]]), 3: torch.tensor([[0, 0], [5, 5]]),
                1: torch.zeros(2, 0, dtype=torch.int64)}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    tiles = short_conv_module.Tiles
    monkeypatch.setattr(short_conv_module, "INTERPRETER_TUNING",
                        {"forward": tiles(16, 16, 1), "backward": tiles(16, 16, 1, 2)})


def conv_inputs(kernel_size, halo, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(R, N, C, generator=gen).to(dtype),
              "weight": (torch.randn(C, kernel_size, generator=gen) / kernel_size ** 0.5).to(dtype),
              "doc_ids": DOC_IDS, "halo": None, "halo_doc_ids": None}
    if halo:
        inputs["halo"] = torch.randn(R, kernel_size - 1, C, generator=gen).to(dtype)
        inputs["halo_doc_ids"] = HALO_DOC_IDS[kernel_size]
    return inputs


def strided(x, weight, doc_ids, halo, halo_doc_ids, activation):
    """The kernel on x as the model passes it: one part of a wider projection (token stride 2C)."""
    wide = torch.cat([x, torch.zeros_like(x)], -1)
    return causal_short_conv(wide[..., :C], weight, doc_ids, halo, halo_doc_ids, activation)


@pytest.mark.parametrize("kernel_size, halo, activation, dtype, fast, tol", [
    (4, True, True, torch.float32, causal_short_conv, 1e-5),
    (4, False, False, torch.float32, strided, 1e-5),
    (3, True, False, torch.float32, causal_short_conv, 1e-5),
    (4, True, True, torch.float16, causal_short_conv, 2e-3),
    (1, True, True, torch.float32, causal_short_conv, 1e-5),
])
def test_kernel_matches_reference(kernel_size, halo, activation, dtype, fast, tol):
    inputs = conv_inputs(kernel_size, halo, dtype) | {"activation": activation}
    grad_names = ["x", "weight"] + (["halo"] if halo and kernel_size > 1 else [])
    compare_with_reference(fast, causal_short_conv_reference, inputs, tol, grad_names)


@pytest.mark.parametrize("activation", [True, False])
def test_reference_is_a_convolution_per_document(activation):
    """Each document of [halo; row] convolved alone by torch's conv1d, zero-padded at its start."""
    inputs = conv_inputs(4, True, torch.float64)
    x, weight, halo = inputs["x"], inputs["weight"], inputs["halo"]
    y = causal_short_conv_reference(**inputs, activation=activation)
    expected = torch.empty_like(x)
    for r in range(R):
        tokens, docs = torch.cat([halo[r], x[r]]), torch.cat([HALO_DOC_IDS[4][r], DOC_IDS[r]])
        starts = [0] + [t for t in range(1, len(docs)) if docs[t] != docs[t - 1]] + [len(docs)]
        for s, e in zip(starts[:-1], starts[1:]):
            if e <= 3:  # a document wholly in the halo: its outputs belong to the previous rank
                continue
            segment = F.pad(tokens[s:e].t(), (3, 0))[None]
            z = F.conv1d(segment, weight[:, None, :], groups=C)[0].t()
            z = F.silu(z) if activation else z
            lo = max(s, 3)  # positions 0..2 are the halo's
            expected[r, lo - 3:e - 3] = z[lo - s:]
    torch.testing.assert_close(y, expected)


class _Context:
    """previous_tail as lctrain.parallel.context.ContextGroup gives it, from fixed tensors (no process group)."""

    def __init__(self, halo, halo_doc_ids):
        self.halo, self.halo_doc_ids = halo, halo_doc_ids

    def previous_tail(self, x_rows, width):
        return self.halo, self.halo_doc_ids


@pytest.mark.parametrize("with_context", [False, True])
def test_short_conv_triton_path_equals_torch_path(parallel_1, monkeypatch, with_context):
    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.model.short_conv import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(C, 4)
    layout = layout_from_cu_seqlens(torch.tensor([0, 5, 6, 20, 36, 37, 38, 74]), rows=R, row_len=N)
    projection = torch.randn(1, R * N, 2 * C)
    halo = torch.randn(R, 3, C)
    cotangent = torch.randn(1, R * N, C)
    results = {}
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        conv.zero_grad()
        p, h = projection.clone().requires_grad_(), halo.clone().requires_grad_()
        # row 0's first document continues from the previous rank, row 1 starts a new one
        layout.context = _Context(h, torch.tensor([[0, 0, 0], [7, 7, 7]])) if with_context else None
        y = conv(p.chunk(2, dim=-1)[0], layout)  # a strided part of a projection, as the mixers pass it
        (y * cotangent).sum().backward()
        results[interpret] = [y.detach(), p.grad, conv.weight.grad.clone()] + ([h.grad] if with_context else [])
    for torch_path, triton_path in zip(results["0"], results["1"]):
        torch.testing.assert_close(triton_path, torch_path, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.zeros(R * N, C)), "x \\[R, N, C\\]"),
    (dict(x=torch.zeros(R, N, C, dtype=torch.int32)), "x \\[R, N, C\\]"),
    (dict(weight=torch.zeros(C, 9)), "1 <= W <= 8"),
    (dict(weight=torch.zeros(C + 1, 4)), "weight must be \\[C, W\\]"),
    (dict(doc_ids=torch.zeros(R, N + 1, dtype=torch.int64)), "doc_ids must be"),
    (dict(doc_ids=torch.zeros(R, N)), "doc_ids must be"),
    (dict(halo_doc_ids=None), "come together"),
    (dict(halo=torch.zeros(R, 4, C)), "halo must be"),
    (dict(halo_doc_ids=torch.zeros(R, 3)), "halo_doc_ids must be"),
])
def test_bad_input_raises(change, message):
    inputs = conv_inputs(4, True) | change
    with pytest.raises(ValueError, match=message):
        causal_short_conv(**inputs)
