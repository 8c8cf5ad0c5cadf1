"""ssm_fft on a CUDA GPU: bf16 and float32 inputs against float64 up to T = 131072 (run through the device tool).

The oracle is the direct float64 sum where it is affordable (T <= 1000) and the float64 torch.fft path beyond it
(itself checked against the direct sum on CPU by tests/test_ssm_fft.py)."""
import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.kernels.ssm_fft import causal_fft_conv, causal_fft_conv_torch, fftconv, s4d_ssm
from lctrain.kernels.ssm_fft.reference import causal_conv_reference, s4d_ssm_reference

pytestmark = pytest.mark.gpu


def conv_inputs(batch, length, channels, taps, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=gen, device="cuda")
    k = torch.randn(channels, taps, generator=gen, device="cuda") / taps**0.5
    return {"u": u.to(dtype), "k": k.to(dtype)}


@pytest.mark.parametrize("batch,length,channels,taps", [(2, 1, 16, 1), (2, 333, 40, 333), (1, 1000, 24, 517)])
def test_causal_fft_conv_bf16_vs_direct_sum(batch, length, channels, taps):
    compare_with_reference(causal_fft_conv, causal_conv_reference,
                           conv_inputs(batch, length, channels, taps, torch.bfloat16), 1e-2)


@pytest.mark.parametrize("batch,length,channels", [(2, 8192, 64), (1, 32769, 64), (1, 65536, 128),
                                                   (1, 131072, 128)])
def test_causal_fft_conv_bf16_long(batch, length, channels):
    compare_with_reference(causal_fft_conv, causal_fft_conv_torch,
                           conv_inputs(batch, length, channels, length, torch.bfloat16), 1e-2)


@pytest.mark.parametrize("options", [dict(tile=512), dict(keep_rows=True), dict(keep_rows=False),
                                     dict(rows_group=1, keep_rows=True), dict(rows_group=128),
                                     dict(rows_maxnreg=None),
                                     dict(rows_group=4, keep_rows=True),
                                     dict(joined_stores=True), dict(joined_stores=True, keep_rows=True),
                                     dict(folded_twiddles=True), dict(folded_twiddles=True, joined_stores=True,
                                                                      keep_rows=True),
                                     dict(idft_channels=32), dict(idft_channels=32, keep_rows=True),
                                     dict(idft_channels=16), dict(idft_channels=8)])
def test_causal_fft_conv_plan_options(options):
    """The tuning options of the Triton path (the benchmark's variants) compute the same convolution."""
    plan = fftconv.fft_plan(20000, **options)

    def fast(u, k):
        return fftconv.CausalFFTConvFunction.apply(u, k, plan, None)

    compare_with_reference(fast, causal_fft_conv_torch, conv_inputs(2, 20000, 40, 15000, torch.bfloat16), 1e-2)


def test_default_plan_memory_budget(monkeypatch):
    """On CUDA the rows are kept when they fit KEEP_ROWS_FREE_FRACTION of the free memory, and not otherwise."""
    u = torch.randn(1, 4096, 64, device="cuda", requires_grad=True)
    k = torch.randn(64, 4096, device="cuda")
    assert fftconv.default_plan(u, k).keep_rows
    monkeypatch.setattr(fftconv, "KEEP_ROWS_FREE_FRACTION", 1e-12)
    assert not fftconv.default_plan(u, k).keep_rows


def test_causal_fft_conv_float32_benchmark_shape():
    """The benchmark's shape (C = 2048, T = 65536) in float32: tf32 products (10-bit mantissa) through six
    transform stages leave a relative error of ~5e-3 (4.6e-3 seen on an H100)."""
    errors = compare_with_reference(causal_fft_conv, causal_fft_conv_torch,
                                     conv_inputs(1, 65536, 2048, 65536, torch.float32), 1e-2)
    print("float32, T=65536, C=2048:", errors)


def test_causal_fft_conv_offsets_past_int32():
    """BST's shape at T = 131072 (8192 channels): the row buffers hold more than 2^31 floats, so offsets must be
    64-bit (an int32 channel x row-length product corrupted memory there). Depthwise, so the last channels, the
    ones past 2^31, are checked against the float64 path run on those channels alone."""
    length, channels, last = 131072, 8192, 3
    inputs = conv_inputs(1, length, channels, length, torch.bfloat16, seed=5)
    u, k = (x.requires_grad_() for x in inputs.values())
    dy = torch.randn(1, length, channels, device="cuda", dtype=torch.bfloat16)
    y = causal_fft_conv(u, k)
    du, dk = torch.autograd.grad(y, (u, k), dy)
    u64 = u.detach()[..., -last:].double().requires_grad_()
    k64 = k.detach()[-last:].double().requires_grad_()
    y64 = causal_fft_conv_torch(u64, k64)
    du64, dk64 = torch.autograd.grad(y64, (u64, k64), dy[..., -last:].double())
    for name, fast, exact in (("y", y[..., -last:], y64), ("du", du[..., -last:], du64), ("dk", dk[-last:], dk64)):
        error = ((fast.double() - exact).norm() / exact.norm()).item()
        assert error <= 1e-2, f"{name}: relative error {error:.3e} in the channels past 2^31 row-buffer floats"


def test_s4d_ssm_documents_bf16():
    gen = torch.Generator(device="cuda").manual_seed(3)
    H, N = 32, 16
    params = {"log_dt": torch.empty(H, device="cuda").uniform_(-5, -2, generator=gen),
              "A_real_log": torch.log(torch.rand(H, N, generator=gen, device="cuda") * 0.5 + 0.01),
              "A_imag": torch.randn(H, N, generator=gen, device="cuda") * 3,
              "B": torch.randn(H, N, 2, generator=gen, device="cuda"),
              "C": torch.randn(H, N, 2, generator=gen, device="cuda") / N**0.5}
    cu_seqlens = torch.tensor([0, 300, 301, 900, 1500], device="cuda")
    inputs = dict(u=torch.randn(1, 1500, H, generator=gen, device="cuda").to(torch.bfloat16), **params,
                  initial_state=torch.randn(4, H, N, 2, generator=gen, device="cuda"))

    def run(ssm):
        return lambda **x: ssm(**x, output_final_state=True, cu_seqlens=cu_seqlens)

    compare_with_reference(run(s4d_ssm), run(s4d_ssm_reference), inputs, 1e-2)
