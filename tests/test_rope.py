"""The fused RoPE (kernels/rope) on CPU: the Triton kernels under the interpreter against the float64 torch formula
(reference.py) through kernel_checks.compare_with_reference (outputs poisoned; y and dx): partial and full rot_dim
(a pair count that is not a power of two too), one block and several (a partial last one), leading dims
[2, L, H, D], inputs read in place from a wider tensor (a chunk of the last dim, heads of a fused projection) and
leading dims that do not flatten, positions that restart per document; long-context positions against the float32
torch path; half precision, the dispatch, bad inputs. The benchmark's CPU dry run is in test_benchmarks.py.
"""
from __future__ import annotations

import pytest
import torch

import lctrain.kernels.rope.fused as rope_fused
from kernel_checks import compare_with_reference
from lctrain.kernels.rope import rope, rope_reference

THETA = 10000.0
BLOCKS = {"one block": rope_fused.INTERPRETER_TUNING, "small blocks": rope_fused.Blocks(elements=128, warps=1)}


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def two_documents(*lead: int, first: int = 9) -> torch.Tensor:
    """Positions [*lead] along the last dim: a document of ``first`` tokens, then one of the rest (restarting at 0)."""
    L = lead[-1]
    row = torch.cat([torch.arange(first), torch.arange(L - first)])
    return row.expand(*lead).clone()


def with_rope(op, rot_dim):
    return lambda x, positions: op(x, positions, rot_dim, THETA)


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("shape, rot_dim", [
    ((2, 21, 3, 32), 16),  # leading dims [2, L]; 16 channels pass through
    ((21, 4, 16), 16),  # full rotation
    ((21, 2, 24), 12),  # 6 pairs (the block's 8 are masked), 12 pass-through channels (16 masked)
])
def test_kernel_matches_reference(monkeypatch, blocks, shape, rot_dim):
    monkeypatch.setattr(rope_fused, "INTERPRETER_TUNING", BLOCKS[blocks])
    inputs = {"x": randn(*shape), "positions": two_documents(*shape[:-2])}
    compare_with_reference(with_rope(rope, rot_dim), with_rope(rope_reference, rot_dim), inputs, 1e-5)


def test_strided_inputs():
    """q as in the attention layer (heads of a chunk of a fused projection's output: row stride 2 H D, read in place)
    and a transposed [L, rows] source (leading dims that do not flatten: copied first)."""
    rows, L, H, D = 2, 11, 3, 16

    def run(op):
        def apply(projection, token_major, positions):
            q = projection.chunk(2, dim=-1)[1].view(rows, L, H, D)
            return [op(q, positions, D, THETA), op(token_major.transpose(0, 1), positions, 8, THETA)]
        return apply

    projection, token_major = randn(rows, L, 2 * H * D), randn(L, rows, H, D, seed=1)
    assert projection.chunk(2, dim=-1)[1].view(rows, L, H, D).stride()[:2] == (L * 2 * H * D, 2 * H * D)
    with pytest.raises(RuntimeError):
        token_major.transpose(0, 1).view(-1, H, D)  # the leading dims do not flatten in place
    compare_with_reference(run(rope), run(rope_reference), {"projection": projection, "token_major": token_major,
                                                            "positions": two_documents(rows, L, first=4)}, 1e-5)


def test_long_context_positions_match_torch_path():
    """Positions up to 131071 (angles ~10^5 rad): the kernel's float32 angles and cos/sin match the float32 torch
    path (the formula checkpoints were trained with), forward and backward."""
    x = randn(64, 2, 32).requires_grad_()
    positions = torch.randint(0, 131072, (64,), generator=torch.Generator().manual_seed(1))
    dy = randn(64, 2, 32, seed=2)
    y, y_ref = rope(x, positions, 32, THETA), rope_reference(x, positions, 32, THETA)
    (dx,), (dx_ref,) = torch.autograd.grad(y, x, dy), torch.autograd.grad(y_ref, x, dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_half_precision(dtype, tol):
    """y and dx come out in x's dtype; the error is their rounding (math in float32)."""
    x = randn(17, 2, 32, dtype=dtype)
    compare_with_reference(with_rope(rope, 32), with_rope(rope_reference, 32),
                           {"x": x, "positions": torch.arange(17)}, tol)
    assert rope(x, torch.arange(17), 32, THETA).dtype == dtype


def test_dispatch_and_edges(monkeypatch):
    """Triton for float32 under the interpreter; the torch formula for float64 and without it; rot_dim 0 is x
    itself; no tokens gives an empty output and gradient."""
    x, positions = randn(5, 2, 8).requires_grad_(), torch.arange(5)
    assert rope(x, positions, 8, THETA).grad_fn.name() == "RoPEFunctionBackward"
    assert rope(x.double(), positions, 8, THETA).grad_fn.name() != "RoPEFunctionBackward"
    assert rope(x, positions, 0, THETA) is x
    empty = torch.zeros(0, 2, 8, requires_grad=True)
    rope(empty, torch.zeros(0, dtype=torch.int64), 8, THETA).sum().backward()
    assert empty.grad.shape == empty.shape
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert rope(x, positions, 8, THETA).grad_fn.name() != "RoPEFunctionBackward"


@pytest.mark.parametrize("x, positions, rot_dim, message", [
    (torch.zeros(5, 2, 8), torch.arange(5), 3, r"rot_dim must be even and in \[0, D = 8\]; got 3"),
    (torch.zeros(5, 2, 8), torch.arange(5), 10, r"rot_dim must be even and in \[0, D = 8\]; got 10"),
    (torch.zeros(5, 2, 8), torch.arange(6), 8, r"positions must be \[..., L\] = x.shape\[:-2\] = \(5,\); got \(6,\)"),
    (torch.zeros(5, 2, 8), torch.arange(5.0), 8, "positions must be an integer tensor"),
    (torch.zeros(5, 8), torch.arange(5), 8, r"x must be \[..., L, H, D\]"),
    (torch.zeros(5, 2, 8, dtype=torch.int32), torch.arange(5), 8, "x must be a floating-point tensor"),
])
def test_bad_input(x, positions, rot_dim, message):
    with pytest.raises(ValueError, match=message):
        rope(x, positions, rot_dim, THETA)
