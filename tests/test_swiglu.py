"""The fused SwiGLU activation (kernels/swiglu) on CPU: the Triton kernels under the interpreter against the float64
torch formula (reference.py) through kernel_checks.compare_with_reference (outputs poisoned; h and d(gate_up)),
with one large block, with small blocks (several row and column blocks, partial at both edges) and with the GPU's
column rule; strided and non-flattening inputs, half precision, the dispatch, the module's Triton path against its
torch path, bad inputs. The benchmark's CPU dry run is in test_benchmarks.py.
"""
from __future__ import annotations

import pytest
import torch

import lctrain.kernels.swiglu.fused as swiglu_fused
from kernel_checks import compare_with_reference
from lctrain.kernels.swiglu import swiglu, swiglu_reference

BLOCKS = {
    "one block": swiglu_fused.INTERPRETER_TUNING,
    "small blocks": swiglu_fused.Blocks(elements=256, max_columns=32, warps=1, fit_columns=False),
    "gpu column rule": swiglu_fused.Blocks(elements=1024, max_columns=64, warps=1, fit_columns=True),
}


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def autograd_nodes(t: torch.Tensor) -> set[str]:
    """Names of every node in t's backward graph."""
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("shape", [(37, 3, 90), (2, 19, 128), (5, 400)])  # 111 rows, odd F = 45; F = 64; F = 200
def test_kernel_matches_reference(monkeypatch, blocks, shape):
    monkeypatch.setattr(swiglu_fused, "INTERPRETER_TUNING", BLOCKS[blocks])
    compare_with_reference(swiglu, swiglu_reference, {"gate_up": 3 * randn(*shape)}, 1e-5)


def test_strided_inputs():
    """gate_up as a column slice of a wider tensor (strided rows, an offset: read in place) and as a transposed view
    (leading dims that do not flatten: copied to rows first)."""
    F = 24

    def run(op):
        return lambda wide: [op(wide[..., 5:5 + 2 * F]), op(wide.transpose(0, 1)[..., :2 * F])]

    compare_with_reference(run(swiglu), run(swiglu_reference), {"wide": 3 * randn(7, 11, 2 * F + 9)}, 1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_half_precision(dtype, tol):
    """h and d(gate_up) come out in the input's dtype; the error is their rounding (math in float32)."""
    gate_up = 3 * randn(41, 2 * 40, dtype=dtype)
    errors = compare_with_reference(swiglu, swiglu_reference, {"gate_up": gate_up}, tol)
    assert swiglu(gate_up).dtype == dtype
    print(errors)


def test_dispatch(monkeypatch):
    """Triton for float32/bfloat16/float16 under the interpreter; the torch formula for float64 and without it."""
    x = randn(6, 16).requires_grad_()
    assert "SwiGLUFunctionBackward" in autograd_nodes(swiglu(x))
    assert "SwiGLUFunctionBackward" not in autograd_nodes(swiglu(x.double()))
    torch.testing.assert_close(swiglu(x.double()), swiglu_reference(x.double()), rtol=0, atol=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "SwiGLUFunctionBackward" not in autograd_nodes(swiglu(x))


def test_empty_rows():
    x = torch.zeros(0, 3, 10, requires_grad=True)
    h = swiglu(x)
    assert h.shape == (0, 3, 5)
    h.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("F", [5632, 2816, 1408, 704])  # ffn 5632 at tensor-parallel sizes 1, 2, 4, 8
def test_gpu_blocks_leave_no_lane_masked(F):
    """On a GPU the column block divides F (no masked lanes) and a block holds at most TUNING.elements."""
    BT, BF, _ = swiglu_fused.block_shape(65536, F, torch.device("cuda"))
    assert F % BF == 0 and BT * BF <= swiglu_fused.TUNING.elements


def test_module_triton_path_equals_torch_path(parallel_1, monkeypatch):
    """SwiGLU (lctrain/model/mlp.py): output and the gradients of x and both weights with and without Triton."""
    from lctrain.config import load_config
    from lctrain.model.hybrid import transformer_config
    from lctrain.model.mlp import SwiGLU

    config = load_config(None, ["model.hidden_size=32", "model.ffn_hidden_size=48", "model.pattern=-"])
    torch.manual_seed(0)
    mlp = SwiGLU(transformer_config(config.model))
    x, dy = randn(2, 13, 32), randn(2, 13, 32, seed=1)
    results = {}
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        mlp.zero_grad()
        leaf = x.clone().requires_grad_()
        y = mlp(leaf, None)
        assert ("SwiGLUFunctionBackward" in autograd_nodes(y)) == (interpret == "1")
        y.backward(dy)
        results[interpret] = [y.detach(), leaf.grad] + [p.grad.clone() for p in mlp.parameters()]
    for triton_path, torch_path in zip(results["1"], results["0"]):
        torch.testing.assert_close(triton_path, torch_path, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate_up, message", [
    (torch.zeros(4, 7), "even, nonzero last dim"),
    (torch.zeros(4, 0), "even, nonzero last dim"),
    (torch.zeros(4, 8, dtype=torch.int32), "gate_up must be float32, bfloat16, float16 or float64"),
])
def test_bad_input(gate_up, message):
    with pytest.raises(ValueError, match=message):
        swiglu(gate_up)
