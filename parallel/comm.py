"""Differentiable collectives of the context-parallel group: what rank r sends is a function of its tokens, so the
gradient of what it receives goes back to the sender.

Every rank must call these in the same order, forward and backward: callers build the same graph on every rank
(rank 0 receives zeros from a collective it still joins; it never skips one).
"""
from __future__ import annotations

import collections
import contextlib

import torch
import torch.distributed as dist

_traffic: collections.Counter | None = None


@contextlib.contextmanager
def count_traffic():
    """While active, tallies the bytes the collectives below bring into this rank, by kind ("all_gather",
    "from_previous"), forward and backward (ring-algorithm volumes for the all-gather and its reduction)."""
    global _traffic
    previous, _traffic = _traffic, collections.Counter()
    try:
        yield _traffic
    finally:
        _traffic = previous


def _count(kind: str, nbytes: int) -> None:
    if _traffic is not None:
        _traffic[kind] += nbytes


class _AllGather(torch.autograd.Function):
    """[n, ...] on each rank -> [size, n, ...] on every rank. Backward: the gradient of rank r's slot summed over the
    ranks that used it (reduce-scatter on NCCL; gloo has none, so all-reduce and keep this rank's slot)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty(size * x.shape[0], *x.shape[1:])  # gloo wants the ranks' blocks along dim 0
        dist.all_gather_into_tensor(out, x, group=group)
        _count("all_gather", (size - 1) * x.numel() * x.element_size())
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        grad = grad.contiguous()
        slot_bytes = grad[0].numel() * grad.element_size()
        if dist.get_backend(group) == "nccl":
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad.view(-1, *grad.shape[2:]), group=group)
            _count("all_gather", (grad.shape[0] - 1) * slot_bytes)
            return mine, None
        dist.all_reduce(grad, group=group)
        _count("all_gather", 2 * (grad.shape[0] - 1) * slot_bytes)
        return grad[dist.get_rank(group)].clone(), None


class _FromPrevious(torch.autograd.Function):
    """Rank r receives rank r - 1's tensor (rank 0 receives zeros). Backward: the gradient goes to rank r - 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _pass_along(x, group, step=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _pass_along(grad, ctx.group, step=-1), None


def _pass_along(x: torch.Tensor, group, step: int) -> torch.Tensor:
    """Send x to rank + step and receive the tensor of rank - step (zeros where that rank does not exist)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    x = x.contiguous()
    out = torch.zeros_like(x)
    ops = []
    if 0 <= rank + step < size:
        ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(group, rank + step), group))
    if 0 <= rank - step < size:
        ops.append(dist.P2POp(dist.irecv, out, dist.get_global_rank(group, rank - step), group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    if 0 <= rank - step < size:
        _count("from_previous", out.numel() * out.element_size())
    return out


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's x stacked along a new leading dim [group size, ...], with gradients to each sender."""
    return _AllGather.apply(x, group)


def from_previous_rank(x: torch.Tensor, group) -> torch.Tensor:
    """The previous rank's x (zeros on rank 0), with gradients to the sender. Needs a group of 2 or more ranks."""
    return _FromPrevious.apply(x, group)
