"""The ``mpu`` object DeepSpeed asks for, built on megatron-core's groups.

DeepSpeed reduces and partitions gradients over what the mpu calls the data-parallel group. Ranks of one
context-parallel group hold the same parameters and different tokens, so their gradients are summed like
data-parallel ones: the group given to DeepSpeed is data-parallel x context-parallel. Tensor-parallel ranks hold
different slices of the parameters: that is DeepSpeed's "model-parallel" group.
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class DeepSpeedMPU:
    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.get_data_parallel_group())

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_data_parallel_group())

    # DeepSpeed's pipeline-aware code paths ask for these; lctrain has no pipeline parallelism.
    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    # Megatron-style names some DeepSpeed versions use for the tensor-parallel group.
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
