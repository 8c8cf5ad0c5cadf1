"""causal_fft_conv (lctrain's Triton FFT convolution) vs the torch.fft path (rfft, multiply, irfft).

Shapes of issue 5: B = 1, C = 2048 channels, T = 8k .. 131k, u [1, T, C], k [C, T]. All impls take float32 inputs
(not the harness's dtype: the issue states the baseline in float32):
torch.fft computes in float32 (cuFFT) along T of [B, T, C] ("torch.fft", lctrain's fallback) or of a channel-major
copy ("torch.fft [C,T]": transpose, FFTs along the contiguous axis, transpose back);
lctrain keeps float32 intermediates and multiplies on tensor cores in tf32. ``SPEC_BF16`` is the same with bfloat16
u and k (lctrain reads and writes bf16; torch.fft upcasts to float32 inside the timed region).

Counted work (the FFT algorithm's, not the DFT-matrix products lctrain actually runs), per channel, N = 2T:
  a real FFT of N points = 2.5 N log2 N flops; a spectral product = 6 flops on each of N / 2 bins;
  fwd: FFT(u), FFT(k), IFFT(y) + 1 product;  bwd: FFT(dy), FFT(u), FFT(k), IFFT(du), IFFT(dk) + 2 products.
Fewest bytes: fwd reads u, k and writes y; bwd reads dy, u, k and writes du, dk (each tensor once).

``cd benchmarks && python -m kernel_ops.fftconv --T 65536`` times the tuning variants of the Triton path (FFTPlan
fields: the spectral tile R2 x R3, hence R1 = N / (R2 R3); the forward's rows kept for the backward or not; the
rows stages' tile order and register caps; the spectral kernels' joined stores and folded twiddles; rows_idft's
128-column tiles of 32, 16 or 8 channels for time-major outputs) and the stages of each, on the same GPU.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from kernel_ops import Impl, OpSpec
from lctrain.kernels.ssm_fft import causal_fft_conv, causal_fft_conv_torch
from lctrain.kernels.ssm_fft import fftconv as triton_fftconv

CHANNELS = 2048


def _make_inputs(dtype: torch.dtype):
    def make_inputs(T: int, seed: int, device: torch.device, _harness_dtype: torch.dtype) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        channels = CHANNELS if device.type == "cuda" else 4
        u = torch.randn(1, T, channels, generator=gen, device=device).to(dtype).requires_grad_()
        k = (torch.randn(channels, T, generator=gen, device=device) / math.sqrt(T)).to(dtype).requires_grad_()
        return {"u": u, "k": k}

    return make_inputs


def _cost(element_bytes: int):
    def cost(T: int) -> tuple[float, float, float, float]:
        n = 2 * T
        fft = 2.5 * n * math.log2(n) * CHANNELS
        product = 6 * (n / 2) * CHANNELS
        tensor = T * CHANNELS * element_bytes
        return 3 * fft + product, 3 * tensor, 5 * fft + 2 * product, 5 * tensor

    return cost


def _torch_fft_channel_major(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The torch.fft path on a [B, C, T] copy of u (FFTs along the contiguous axis), transposed back."""
    length = u.shape[1]
    uc = u.float().transpose(1, 2).contiguous()
    y = torch.fft.irfft(torch.fft.rfft(uc, n=2 * length) * torch.fft.rfft(k.float(), n=2 * length), n=2 * length)
    return y[..., :length].transpose(1, 2).contiguous().to(u.dtype)


def _impls() -> list[Impl]:
    return [Impl("torch.fft", lambda x: causal_fft_conv_torch(x["u"], x["k"])),
            Impl("torch.fft [C,T]", lambda x: _torch_fft_channel_major(x["u"], x["k"])),
            Impl("lctrain", lambda x: causal_fft_conv(x["u"], x["k"]))]


SPEC = OpSpec(name="fftconv", tiny_lengths=[64],
              make_inputs=_make_inputs(torch.float32), cost=_cost(4), impls=_impls, baseline="torch.fft",
              input_dtype=torch.float32)
SPEC_BF16 = dataclasses.replace(SPEC, make_inputs=_make_inputs(torch.bfloat16), cost=_cost(2),
                                input_dtype=torch.bfloat16)

# Tuning variants of the Triton path: FFTPlan fields changed from the default plan (default_plan), each timed
# against the default at one length.
VARIANTS = {"recompute rows": dict(keep_rows=False),
            "rows n23-first (group 128)": dict(rows_group=128),
            "rows no register cap": dict(rows_maxnreg=None),
            "joined stores": dict(joined_stores=True),
            "joined stores, folded twiddles": dict(joined_stores=True, folded_twiddles=True),
            "idft 4 n23 x 32 channels (whole lines)": dict(idft_channels=32),
            "idft 8 n23 x 16 channels": dict(idft_channels=16),
            "idft 16 n23 x 8 channels": dict(idft_channels=8),
            "tile 32x16": dict(tile=512)}


def _variant_impls() -> list[Impl]:
    def variant(options):
        def forward(x):
            plan = triton_fftconv.default_plan(x["u"], x["k"])
            if "tile" in options:
                plan = triton_fftconv.fft_plan(x["u"].shape[1], tile=options["tile"], keep_rows=plan.keep_rows)
            else:
                plan = dataclasses.replace(plan, **options)
            return triton_fftconv.CausalFFTConvFunction.apply(x["u"], x["k"], plan, None)

        return forward

    return [Impl("lctrain", lambda x: causal_fft_conv(x["u"], x["k"]))] + [
        Impl(f"lctrain {name}", variant(options)) for name, options in VARIANTS.items()]


def _stage_times(T: int, device: torch.device) -> list[str]:
    """Milliseconds of each kernel, fwd and bwd (float32 inputs; the in-place stages overwrite their inputs, so the
    values drift from call to call: the timing does not depend on them). The rows stages of the time-major signals
    under three tile orders and register caps, and rows_idft y in 128-column tiles of 32, 16, 8 channels; the
    spectral ones as they are, and with joined stores (and folded twiddles)."""
    from harness import time_ms

    x = _make_inputs(torch.float32)(T, 0, device, torch.float32)
    u, k = x["u"].detach(), x["k"].detach()
    plan = triton_fftconv.fft_plan(T)
    S = triton_fftconv._Signal
    u_rows = triton_fftconv.rows_dft(S.time_major_of(u), plan)
    k_rows = triton_fftconv.rows_dft(S.channel_major_of(k), plan)
    dy_rows, y_rows, dk_rows = u_rows.clone(), torch.empty_like(u_rows), torch.empty_like(k_rows)
    y = torch.empty_like(u)
    dk = torch.empty_like(k)
    product, grad = triton_fftconv.spectral_product, triton_fftconv.spectral_grad
    stages = {}
    for options in (dict(), dict(rows_group=128), dict(rows_maxnreg=None)):
        p = dataclasses.replace(plan, **options)
        name = ", ".join(f"{key} {value}" for key, value in p.__dict__.items() if key in ("rows_group", "rows_maxnreg"))
        stages[f"rows_dft u [T, C] ({name})"] = lambda i, p=p: triton_fftconv.rows_dft(S.time_major_of(u), p)
        stages[f"rows_idft y [T, C] ({name})"] = lambda i, p=p: triton_fftconv.rows_idft(u_rows, S.time_major_of(y), p)
        stages[f"rows_dft k [C, T] ({name})"] = lambda i, p=p: triton_fftconv.rows_dft(S.channel_major_of(k), p)
        stages[f"rows_idft dk [C, T] ({name})"] = lambda i, p=p: triton_fftconv.rows_idft(
            k_rows, S.channel_major_of(dk), p)
    for channels in (32, 16, 8):
        p = dataclasses.replace(plan, idft_channels=channels)
        stages[f"rows_idft y [T, C] (idft_channels {channels})"] = lambda i, p=p: triton_fftconv.rows_idft(
            u_rows, S.time_major_of(y), p)
    stages["spectral product"] = lambda i: product(u_rows, k_rows, 1, u.shape[2], plan, y_rows)
    stages["spectral grad (du, dk)"] = lambda i: grad(dy_rows, u_rows, k_rows, dk_rows, 1, u.shape[2], plan, True, True)
    for name, options in (("joined stores", dict(joined_stores=True)),
                          ("joined stores, folded twiddles", dict(joined_stores=True, folded_twiddles=True))):
        p = dataclasses.replace(plan, **options)
        stages[f"spectral product, {name}"] = lambda i, p=p: product(u_rows, k_rows, 1, u.shape[2], p, y_rows)
        stages[f"spectral grad (du, dk), {name}"] = lambda i, p=p: grad(dy_rows, u_rows, k_rows, dk_rows, 1,
                                                                        u.shape[2], p, True, True)
    return [f"  {name:52} {time_ms(fn):8.3f} ms" for name, fn in stages.items()]


def main(argv=None) -> int:
    import argparse

    from harness import measure_ceilings, print_table
    from kernels import benchmark

    parser = argparse.ArgumentParser(description="tuning variants and stage times of lctrain's FFT convolution")
    parser.add_argument("--T", type=int, default=65536)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    variants = dataclasses.replace(SPEC, lengths=[args.T], impls=_variant_impls, baseline="lctrain")
    rows = benchmark(variants, [args.T], device, torch.float32, reps=20)
    print_table(rows, measure_ceilings(), f"== fftconv tuning variants on {torch.cuda.get_device_name()}, "
                                         f"float32 inputs", baseline_impl="lctrain")
    print(f"stages at T={args.T}, C={CHANNELS}, plan {triton_fftconv.fft_plan(args.T)} with the options named:")
    print("\n".join(_stage_times(args.T, device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
