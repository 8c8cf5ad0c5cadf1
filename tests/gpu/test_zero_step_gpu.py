"""lctrain.train.zero_step on CUDA (one process, nccl): the checks of tests/test_zero_step.py with the CUDA
multi-tensor norm kernels and the fused AdamW the training step uses. Three bf16/fp32 ZeRO 1/2 steps equal torch's
fused AdamW + clip_grad_norm_ on the same gradients and the unpatched DeepSpeed path (2e-6); a NaN gradient skips
the step, through the norm and through the overflow flag alone."""
from __future__ import annotations

import pytest
import torch

from test_zero_step import check_matches_reference, check_nan_gradient_skips_the_step

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("stage", [1, 2])
def test_fused_step_matches_torch_adamw_with_clipping_cuda(parallel_1, bf16, stage):
    check_matches_reference(torch.device("cuda"), bf16, stage)


@pytest.mark.parametrize("norm", [True, False], ids=["with_norm", "flag_only"])
def test_nan_gradient_skips_the_step_cuda(parallel_1, norm):
    check_nan_gradient_skips_the_step(torch.device("cuda"), 2, norm)
