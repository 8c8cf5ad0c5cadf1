"""Process groups: tensor-, context- and data-parallel, through megatron-core's parallel_state.

Ranks of one context-parallel group hold the same parameters and different tokens of the same sequences; ranks of
one data-parallel group hold the same parameters and different sequences. Gradients are therefore reduced over
data-parallel x context-parallel ranks (the DeepSpeed mpu adapter, parallel/mpu.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tensor_parallel_size: int
    tensor_parallel_rank: int
    context_parallel_size: int
    context_parallel_rank: int
    data_parallel_size: int
    data_parallel_rank: int
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def _pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_parallel(tensor_parallel_size: int = 1, context_parallel_size: int = 1, seed: int = 1234,
                  timeout_minutes: int = 30) -> ParallelLayout:
    """Start torch.distributed (from the launcher's RANK/WORLD_SIZE/MASTER_ADDR; a one-process group when run bare)
    with nccl on GPUs and gloo on CPUs, then megatron-core's model-parallel groups."""
    device = _pick_device()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # started by a launcher (deepspeed, torchrun, Ray Train)
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain `python` run: one process. No RANK or MASTER_PORT goes into the environment: processes
            # this one starts (tests, benchmarks) would inherit a port this process already listens on. LOCAL_RANK
            # does (DeepSpeed's engine asserts it is set; a launcher sets its own for each process it starts).
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    world = dist.get_world_size()
    if world % (tensor_parallel_size * context_parallel_size):
        raise ValueError(f"world size {world} must be divisible by parallel.tensor_parallel_size x "
                         f"context_parallel_size = {tensor_parallel_size * context_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             context_parallel_size=context_parallel_size)
    if device.type == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the parallel linears look the tracker up on CUDA
    return current_layout(device)


def current_layout(device: torch.device | None = None) -> ParallelLayout:
    ps = parallel_state
    return ParallelLayout(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tensor_parallel_size=ps.get_tensor_model_parallel_world_size(), tensor_parallel_rank=ps.get_tensor_model_parallel_rank(),
        context_parallel_size=ps.get_context_parallel_world_size(), context_parallel_rank=ps.get_context_parallel_rank(),
        data_parallel_size=ps.get_data_parallel_world_size(), data_parallel_rank=ps.get_data_parallel_rank(),
        device=device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")),
    )


def shutdown_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
