"""One checking mechanism for every kernel: values and every gradient of a fast op against its reference.

``compare_with_reference`` runs the op under test and its reference on the same inputs, backpropagates the same
random cotangent through every output (final states included), and compares outputs and input gradients by
relative error ||fast - ref|| / ||ref||. The reference runs in float64 on copies of the inputs. Kernel outputs are
poisoned (NaN) before the fast run, so an element left unwritten fails.
"""
from __future__ import annotations

from typing import Callable

import torch

from lctrain.kernels.common import poisoned_outputs


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) (the plain difference where both are 0)."""
    actual, expected = actual.double(), expected.double()
    denom = max(expected.norm().item(), floor)
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def flatten(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if outputs is None:
        return []
    return [t for o in outputs for t in flatten(o)]


def compare_with_reference(
    fast: Callable,
    reference: Callable,
    inputs: dict[str, torch.Tensor | None],
    tol: float,
    grad_names: list[str] | None = None,
    seed: int = 0,
    grad_floors: dict[str, float] | None = None,
) -> dict[str, float]:
    """Return {name: relative error} for each output and input gradient; assert every one is <= tol and finite.

    ``fast(**inputs)`` and ``reference(**inputs)`` must return the same nested structure of tensors. Inputs named in
    ``grad_names`` (default: every floating tensor input) get gradients compared. ``grad_floors`` {name: norm}: for a
    gradient whose true value can vanish (a gate's, once every gate is shut), the error is taken relative to
    max(||reference||, floor) instead, the floor being the gradient's norm in an ordinary regime.
    """
    if grad_names is None:
        grad_names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def leaves(dtype=None):
        out = {}
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor):
                t = t.detach().clone()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                t.requires_grad_(name in grad_names)
            out[name] = t
        return out

    fast_in = leaves()
    with poisoned_outputs():
        fast_out = flatten(fast(**fast_in))
    ref_in = leaves(torch.float64)
    ref_out = flatten(reference(**ref_in))
    assert len(fast_out) == len(ref_out), f"{len(fast_out)} outputs vs reference's {len(ref_out)}"

    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref_out]
    errors: dict[str, float] = {}
    for i, (f, r) in enumerate(zip(fast_out, ref_out)):
        assert f.shape == r.shape, f"output {i}: shape {tuple(f.shape)} vs reference {tuple(r.shape)}"
        assert torch.isfinite(f).all(), f"output {i} has NaN/inf (unwritten or unstable)"
        errors[f"out{i}"] = rel_err(f, r)

    def backward(outs, leaves_):
        pairs = [(o, c.to(o.device, o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])

    if grad_names:
        backward(fast_out, fast_in)
        backward(ref_out, ref_in)
        for name in grad_names:
            g_fast, g_ref = fast_in[name].grad, ref_in[name].grad
            assert g_ref is not None, f"reference gives no gradient for {name}"
            assert g_fast is not None, f"no gradient reached {name}"
            assert torch.isfinite(g_fast).all(), f"gradient of {name} has NaN/inf"
            errors[f"d{name}"] = rel_err(g_fast, g_ref, (grad_floors or {}).get(name, 0.0))
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors
