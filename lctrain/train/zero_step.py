"""Fused gradient checks for DeepSpeed's ZeRO stage 1/2 optimizer step.

``DeepSpeedZeroOptimizer.step`` (deepspeed/runtime/zero/stage_1_and_2.py) walks the gradients one tensor at a time
twice before the update: ``has_overflow_partitioned_grads_serial`` (amax, amin, two isfinite, and, not, add per
gradient) and ``get_grad_norm_direct`` (a float64 copy and a float64 norm per gradient). On a 1.39B model (297
tensors) that is ~3,500 small kernels and ~20 ms of kernel time around a 15 ms fused AdamW. Both are replaced here,
on one optimizer instance, by drop-ins with the same contract built on one ``torch._foreach_norm`` pass each
(multi-tensor kernels, float32 accumulation). DeepSpeed's control flow stays as it is: a step with a non-finite
gradient is skipped, the update is clipped by the global norm, fp32 master weights and Adam states live in
DeepSpeed's flat partitions over its data-parallel group (data x context parallel ranks, lctrain.parallel.mpu).

Difference from DeepSpeed's loops: the sums of squares accumulate in float32, not float64 (relative error ~1e-7 of
the norm, which only sets the clipping factor), so a gradient whose norm exceeds float32's range (~1.8e19) counts
as non-finite and its step is skipped.
"""
from __future__ import annotations

import types

import torch


def _sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    """sum_i ||g_i||^2 in float32 (0-dim); non-finite if any element of any g_i is."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


def _has_overflow(self) -> torch.Tensor:
    """Drop-in for ``has_overflow_partitioned_grads_serial``: a [1] bool tensor, whether any gradient of this rank's
    partitions holds inf or NaN."""
    grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    device = grads[0].device if grads else torch.device(self.device)
    return torch.isfinite(_sum_of_squares(grads, device)).logical_not().reshape(1)


def _grad_norm(self, gradients, params, norm_type=2):
    """Drop-in for ``get_grad_norm_direct``: the L2 norm of the whole gradient, the local partition's squares summed
    over the data-parallel group and the model-parallel group (parameters replicated over tensor-parallel ranks
    counted on rank 0 only, as DeepSpeed does); inf/NaN become -1, DeepSpeed's sentinel for a failed norm. lctrain has
    no pipeline parallelism, so DeepSpeed's skip of pipeline-replicated parameters has nothing to skip."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    real = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g for g, p in zip(real, params) if is_model_parallel_parameter(p) or self.model_parallel_rank == 0]
    device = counted[0].device if counted else torch.device(self.device)
    total = _sum_of_squares(counted, device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def fuse_gradient_checks(optimizer) -> bool:
    """Install the fused overflow check and gradient norm on ``optimizer`` (the engine's ``engine.optimizer``) when
    it is DeepSpeed's ZeRO stage 1/2 optimizer with the gradients on the device (no CPU offload, no MoE groups);
    returns whether it did. Other optimizers (ZeRO 0 and 3, offload) are left as they are."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload or optimizer.has_moe_layers:
        return False
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_has_overflow, optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm, optimizer)
    return True
