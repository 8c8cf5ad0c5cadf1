"""One module per operator benchmarked by benchmarks/kernels.py; each defines ``SPEC`` (an ``OpSpec``)."""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class OpSpec:
    """An operator to benchmark at several lengths T.

    make_inputs(T, seed, device, dtype) -> dict of tensors (differentiable ones with requires_grad);
    cost(T) -> (fwd_flops, fwd_bytes, bwd_flops, bwd_bytes): the op's useful work and fewest bytes moved.
    """

    name: str
    lengths: list[int]
    tiny_lengths: list[int]
    make_inputs: Callable[[int, int, torch.device, torch.dtype], dict]
    cost: Callable[[int], tuple[float, float, float, float]]
    impls: Callable[[], list[Impl]]
    baseline: str
    input_dtype: torch.dtype | None = None  # set when the op fixes its inputs' dtype (the table's title says it)
