"""Tensor-parallel helpers for parameters that are not inside a parallel linear layer (per-head or per-channel)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


def tp_rank_size() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def sharded_parameter(full: torch.Tensor, dim: int = 0) -> torch.nn.Parameter:
    """This rank's slice of a parameter initialised in full on every rank (so the model does not depend on the
    tensor-parallel size), marked like Megatron's own sharded weights for checkpoint consolidation."""
    rank, size = tp_rank_size()
    local = full.chunk(size, dim=dim)[rank].clone()
    param = torch.nn.Parameter(local)
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


def replicated_parameter(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """A parameter every tensor-parallel rank holds whole but applies to different local heads (a norm weight shared
    by all heads): its full gradient is the sum of the ranks' gradients, so they are summed as they are produced."""
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        def sum_over_ranks(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=group)
            return grad

        param.register_hook(sum_over_ranks)
    return param


def gather_last_dim(local: torch.Tensor) -> torch.Tensor:
    """Concatenate the tensor-parallel ranks' slices along the last dimension (any device; no autograd)."""
    rank, size = tp_rank_size()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)
