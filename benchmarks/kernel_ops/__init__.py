"""One module per operator benchmarked by benchmarks/kernels.py; each defines ``SPEC`` (an ``OpSpec``)."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch


@dataclasses.dataclass
class Impl:
    """One implementation of an op: ``forward(inputs) -> output tensor(s)``; ``unavailable`` says why it cannot run;
    ``cost`` overrides the op's cost model for an impl that computes something else (a reference point)."""

    name: str
    forward: Callable[[dict], object]
    unavailable: str | None = None
    cost: Callable[[int], tuple[float, float, float, float]] | None = None


# The issues' benchmark lengths (8k to 131k tokens); each op times these unless it says otherwise.
LENGTHS = (8192, 32768, 65536, 131072)


@dataclasses.dataclass
class OpSpec:
    """An operator to benchmark at several lengths T.

    make_inputs(T, seed, device, dtype) -> dict of tensors (differentiable ones with requires_grad);
    cost(T) -> (fwd_flops, fwd_bytes, bwd_flops, bwd_bytes): the op's useful work and fewest bytes moved.
    """

    name: str
    make_inputs: Callable[[int, int, torch.device, torch.dtype], dict]
    cost: Callable[[int], tuple[float, float, float, float]]
    impls: Callable[[], list[Impl]]
    baseline: str
    lengths: list[int] = dataclasses.field(default_factory=lambda: list(LENGTHS))
    tiny_lengths: list[int] = dataclasses.field(default_factory=lambda: [20, 70])  # the --tiny CPU dry run's
    input_dtype: torch.dtype | None = None  # set when the op fixes its inputs' dtype (the table's title says it)


def fla_impl(module: str, function: str, call: Callable[[Callable, dict], object]) -> Impl:
    """The peer, flash-linear-attention (from the GPU bundle; never a dependency of lctrain): ``function`` of
    ``module`` applied by ``call(function, inputs)``; unavailable, with the reason, without CUDA or without fla."""
    if not torch.cuda.is_available():
        return Impl("fla", lambda x: None, unavailable="fla's kernels need a CUDA GPU")
    try:
        fla_chunk_o = importlib.import_module("fla.ops.common.chunk_o")
        peer = getattr(importlib.import_module(module), function)
    except Exception as error:  # noqa: BLE001 - any import failure makes the peer unavailable, with its reason
        return Impl("fla", lambda x: None, unavailable=f"fla import failed: {type(error).__name__}: {error}")
    # fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (its issue #640, a miscompile in one of
    # its kernels); for timing only, bypass the guard, as the project rules allow. Its gradients are not checked.
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    return Impl("fla", lambda x: call(peer, x))
