"""Short causal conv + SiLU with document resets: lctrain's fused Triton kernels (causal_short_conv) against the
torch shifted sum they replace in the model (the baseline: reference.py, the path ShortConv took before), and
flash-linear-attention's causal_conv1d (activation "silu", documents as cu_seqlens; Triton) as the peer.

Shape: B = 1, C = 3072 channels (a GDN-H1 1.3B layer's v width, or q and k together), W = 4, bf16 x and weight,
eight documents per row (fixed random boundaries). On CPU (--tiny) C = 16.

Cost model per element of [T, C]: forward 2W flops (the taps; SiLU not counted), backward 4W (dx and dweight).
Fewest bytes: forward reads x and writes y; backward reads x and dy and writes dx (the document ids, 8 bytes per
token, and the weight are negligible).

``cd benchmarks && python -m kernel_ops.short_conv --T 65536`` times the tile variants of the Triton path (TUNING of
kernels/short_conv/conv.py) on the same GPU.
"""
from __future__ import annotations

import dataclasses

import torch

from . import Impl, OpSpec, fla_impl

GPU_CHANNELS, CPU_CHANNELS = 3072, 16
KERNEL_SIZE = 4
DOCUMENTS = 8


def make_inputs(T: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    channels = GPU_CHANNELS if device.type == "cuda" else CPU_CHANNELS
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, channels, generator=gen)
    weight = torch.randn(channels, KERNEL_SIZE, generator=gen) / KERNEL_SIZE ** 0.5
    inner = torch.randperm(T - 1, generator=gen)[: DOCUMENTS - 1] + 1
    cu_seqlens = torch.cat([torch.tensor([0]), inner.sort().values, torch.tensor([T])])
    doc_ids = torch.searchsorted(cu_seqlens, torch.arange(T), right=True) - 1
    return {"x": x.to(device, dtype).requires_grad_(), "weight": weight.to(device, dtype).requires_grad_(),
            "doc_ids": doc_ids.view(1, T).to(device), "cu_seqlens": cu_seqlens.to(device)}


def cost(T: int) -> tuple[float, float, float, float]:
    elements = T * GPU_CHANNELS
    element_bytes = 2  # bf16
    return 2 * KERNEL_SIZE * elements, 2 * elements * element_bytes, 4 * KERNEL_SIZE * elements, \
        3 * elements * element_bytes


def _lctrain() -> Impl:
    from lctrain.kernels.short_conv import causal_short_conv

    return Impl("lctrain", lambda x: causal_short_conv(x["x"], x["weight"], x["doc_ids"]))


def _torch() -> Impl:
    from lctrain.kernels.short_conv import causal_short_conv_reference

    return Impl("torch", lambda x: causal_short_conv_reference(x["x"], x["weight"], x["doc_ids"]))


def _fla() -> Impl:
    return fla_impl("fla.modules.causal_conv1d", "causal_conv1d",
                    lambda f, x: f(x["x"], x["weight"], activation="silu", cu_seqlens=x["cu_seqlens"])[0])


SPEC = OpSpec(
    name="short_conv",
    make_inputs=make_inputs,
    cost=cost,
    impls=lambda: [_lctrain(), _torch(), _fla()],
    baseline="torch",
)

# Tile variants (conv.TUNING entries: Tiles(tokens, channels, warps, blocks_per_program)), each against the default.
VARIANTS = {
    "fwd 32x128 4 warps": {"forward": (32, 128, 4, 1)},
    "fwd 32x64 4 warps": {"forward": (32, 64, 4, 1)},
    "fwd 128x64 8 warps": {"forward": (128, 64, 8, 1)},
    "bwd 64x64 8 warps": {"backward": (64, 64, 8, 16)},
    "bwd 32x128 8 warps": {"backward": (32, 128, 8, 32)},
    "bwd 16x128 4 warps": {"backward": (16, 128, 4, 64)},
    "bwd 8 tiles/program": {"backward": (32, 64, 4, 8)},
    # fewer registers per program (offline sm_90 compile, NOTES.md): more programs resident per SM
    "bwd 32x32 4 warps": {"backward": (32, 32, 4, 8)},
    "bwd 32x64 4 warps (before)": {"backward": (32, 64, 4, 32)},
    "bwd 16x64 4 warps": {"backward": (16, 64, 4, 16)},
}


def _variant_impls(defaults: dict) -> list[Impl]:
    """lctrain under each tile set; a forward installs its tiles in conv.TUNING and leaves them there, so that its
    backward (which reads TUNING when it runs) uses them too."""
    from lctrain.kernels.short_conv import causal_short_conv
    from lctrain.kernels.short_conv import conv

    def variant(overrides):
        tuning = defaults | {role: conv.Tiles(*tiles) for role, tiles in overrides.items()}

        def forward(x):
            conv.TUNING.update(tuning)
            return causal_short_conv(x["x"], x["weight"], x["doc_ids"])

        return forward

    return [Impl("lctrain", variant({}))] + [Impl(f"lctrain {name}", variant(o)) for name, o in VARIANTS.items()]


def main(argv=None) -> int:
    """The tile variants' fwd and fwd+bwd at one length, against the default tiles, on a CUDA GPU."""
    import argparse

    from harness import measure_ceilings, print_table
    from kernels import benchmark

    from lctrain.kernels.short_conv import conv

    parser = argparse.ArgumentParser(description="tile variants of lctrain's short conv kernels")
    parser.add_argument("--T", type=int, default=65536)
    args = parser.parse_args(argv)
    defaults = dict(conv.TUNING)
    variants = dataclasses.replace(SPEC, lengths=[args.T], impls=lambda: _variant_impls(defaults), baseline="lctrain")
    try:
        rows = benchmark(variants, [args.T], torch.device("cuda"), torch.bfloat16, reps=20)
    finally:
        conv.TUNING.update(defaults)
    print_table(rows, measure_ceilings(), f"== short_conv tile variants on {torch.cuda.get_device_name()}, bf16",
                baseline_impl="lctrain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
