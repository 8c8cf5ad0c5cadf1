"""lctrain.train.zero_step: DeepSpeed's ZeRO 1/2 step with the fused overflow check and gradient norm, built as
lctrain.train.loop builds it (build_optimizer, deepspeed_config, DeepSpeedMPU; one process), on a model whose loss
sum_i <w_i, c_i> has the exact gradient c_i in bf16 and fp32. After three steps the fp32 master weights equal a plain
torch AdamW + clip_grad_norm_ reference on the same gradients, and the unpatched DeepSpeed path; a NaN gradient
skips the step; the per-tensor loops are gone from the step's ops. The first two checks also run on CUDA (marked
gpu)."""
from __future__ import annotations

import collections

import pytest
import torch

from lctrain.config import RunConfig
from lctrain.train.loop import build_optimizer, deepspeed_config
from lctrain.train.zero_step import fuse_gradient_checks

SHAPES = [(48, 32), (32,), (3, 1, 4), (64, 48), (48,), (7,)] * 5  # 30 tensors; "conv" ones get no weight decay
PER_TENSOR_OPS = {"aten::amax", "aten::amin", "aten::isfinite", "aten::linalg_vector_norm", "aten::to"}


class Bilinear(torch.nn.Module):
    """loss = sum_i <w_i, c_i>: the gradient of w_i is c_i exactly, whatever the parameter dtype."""

    def __init__(self):
        super().__init__()
        for i, shape in enumerate(SHAPES):
            self.register_parameter(f"{'conv' if len(shape) == 3 else 'w'}{i}", torch.nn.Parameter(torch.randn(shape) * 0.5))

    def forward(self, coefficients):
        return sum((w.float() * c).sum() for w, c in zip(self.parameters(), coefficients))


def gradients(step: int, device) -> list[torch.Tensor]:
    """Step ``step``'s gradients, bf16-representable (so bf16 and fp32 engines see the same values); global norm ~4,
    above the clip of 1."""
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * 0.1).bfloat16().float().to(device) for s in SHAPES]


def engine_for(device, bf16: bool, stage: int, fused: bool, norm: bool = True):
    import deepspeed

    from lctrain.parallel.mpu import DeepSpeedMPU

    torch.manual_seed(0)
    model = Bilinear().to(device)
    config = RunConfig()
    config.deepspeed.zero_stage = stage
    config.train.lr = 1e-2
    if not norm:  # no clipping, no norm: the overflow flag alone decides whether the step runs
        config.train.grad_clip = 0.0
        config.deepspeed.extra = {"zero_optimization": {"compute_grad_norm": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config, device),
                                      config=deepspeed_config(config, bf16), mpu=DeepSpeedMPU(),
                                      dist_init_required=False)
    if fused:
        assert fuse_gradient_checks(engine.optimizer)
    return engine, config


def train(engine, steps: int, device, poison_step: int | None = None) -> list[torch.Tensor]:
    for step in range(steps):
        coefficients = gradients(step, device)
        if step == poison_step:
            coefficients[3][1, 2] = float("nan")
        engine.backward(engine(coefficients))
        engine.step()
    return [p.detach().float().cpu().clone() for p in engine.optimizer.single_partition_of_fp32_groups]


def reference(engine_params, config, steps: int, device) -> list[torch.Tensor]:
    """torch AdamW (same groups as build_optimizer) + clip_grad_norm_ on fp32 copies of the initial weights, flattened
    in the engine's order to compare with its flat fp32 partitions."""
    torch.manual_seed(0)
    model = Bilinear().to(device)
    with torch.no_grad():
        for p, start in zip(model.parameters(), engine_params):
            p.copy_(start.float())  # a bf16 engine starts its fp32 masters from the rounded weights
    optimizer = build_optimizer(model, config, device)
    for step in range(steps):
        for p, c in zip(model.parameters(), gradients(step, device)):
            p.grad = c.clone()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), config.train.grad_clip)
        optimizer.step()
    return [torch.cat([p.detach().reshape(-1) for p in g["params"]]).cpu() for g in optimizer.param_groups]


def check_matches_reference(device, bf16: bool, stage: int):
    steps = 3
    engine, config = engine_for(device, bf16, stage, fused=True)
    start = [p.detach().clone() for p in engine.module.parameters()]
    fused = train(engine, steps, device)
    unfused = train(engine_for(device, bf16, stage, fused=False)[0], steps, device)
    expected = reference(start, config, steps, device)
    for got, old, want in zip(fused, unfused, expected):
        got = got[:want.numel()]  # the flat partition may carry alignment padding at its end
        assert torch.allclose(got, want, atol=2e-6, rtol=0), (got - want).abs().max()
        assert torch.allclose(got, old[:want.numel()], atol=2e-6, rtol=0), (got - old[:want.numel()]).abs().max()


def check_nan_gradient_skips_the_step(device, stage: int, norm: bool):
    engine, _ = engine_for(device, True, stage, fused=True, norm=norm)
    before = train(engine, 1, device)
    after = train(engine, 1, device, poison_step=0)
    assert engine.optimizer.overflow and engine.skipped_steps == 1
    if norm:
        assert engine.get_global_grad_norm() == float("inf")
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def per_tensor_ops(device, fused: bool) -> int:
    from torch.profiler import ProfilerActivity, profile

    engine, _ = engine_for(device, True, 1, fused=fused)
    engine.backward(engine(gradients(0, device)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    top = [e.name for e in prof.events() if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    counts = collections.Counter(top)
    return sum(counts[name] for name in PER_TENSOR_OPS)


# On CUDA the same checks run the multi-tensor norm kernels and the fused AdamW the training step uses.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("stage", [1, 2])
def test_fused_step_matches_torch_adamw_with_clipping(parallel_1, device, bf16, stage):
    check_matches_reference(torch.device(device), bf16, stage)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [True, False], ids=["with_norm", "flag_only"])
def test_nan_gradient_skips_the_step(parallel_1, device, norm):
    check_nan_gradient_skips_the_step(torch.device(device), 2, norm)


def test_per_tensor_loops_are_gone(parallel_1):
    before, after = per_tensor_ops(torch.device("cpu"), False), per_tensor_ops(torch.device("cpu"), True)
    # before: amax, amin, two isfinite, a float64 copy, a norm... per gradient; after: a fixed few per step
    assert before >= 4 * len(SHAPES) and after < len(SHAPES), (before, after)
