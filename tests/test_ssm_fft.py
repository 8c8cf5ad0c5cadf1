"""ssm_fft on CPU: the Triton FFT convolution (interpreter, float32) and the S4D SSM against float64 direct sums and
token-by-token recurrences, values and every gradient (compare_with_reference, outputs poisoned)."""
import os

import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.kernels.ssm_fft import (causal_fft_conv, causal_fft_conv_torch, s4d_kernel, s4d_lin_init, s4d_ssm,
                                     s4d_transition)
from lctrain.kernels.ssm_fft import fftconv
from lctrain.kernels.ssm_fft.reference import causal_conv_reference, s4d_kernel_reference, s4d_ssm_reference

TOL = 1e-4


def conv_inputs(batch, length, channels, taps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(batch, length, channels, generator=gen),
            "k": torch.randn(channels, taps, generator=gen) / taps**0.5}


def with_plan(plan):
    """causal_fft_conv through the Triton path with this plan (its options, not the default plan's)."""
    return lambda u, k: fftconv.CausalFFTConvFunction.apply(u, k, plan, None)


@pytest.mark.parametrize("length,taps", [(1, 1), (17, 17), (100, 37), (257, 257)])
def test_causal_fft_conv_matches_direct_sum(length, taps):
    assert os.environ.get("TRITON_INTERPRET") == "1", "these tests exercise the Triton kernels under the interpreter"
    compare_with_reference(causal_fft_conv, causal_conv_reference, conv_inputs(2, length, 2, taps), TOL)


# every tile shape and row-blocking of the kernels, forced at small T (the result does not depend on N >= 2T)
# (R1, R2 x R3) = (32, 16x16), (32, 32x16), (64, 64x16), (256, 64x16): two row blocks and two K steps
@pytest.mark.parametrize("fft_size,tile", [(8192, 256), (16384, 1024), (65536, 1024), (262144, 1024)])
def test_causal_fft_conv_every_plan(fft_size, tile):
    plan = fftconv.fft_plan(45, fft_size, tile, keep_rows=fft_size == 65536)
    fast = with_plan(plan)
    compare_with_reference(fast, causal_conv_reference, conv_inputs(1, 45, 1, 30, seed=1), TOL)


@pytest.mark.parametrize("rows_group", [16, 1])
def test_causal_fft_conv_gpu_column_tiles(monkeypatch, rows_group):
    """The GPU's 64-column rows tiles (the interpreter otherwise takes wide ones), time- and channel-major, with a
    partial channel tile; the default tile order (groups of 16 n23 tiles) and channel-first."""
    monkeypatch.setattr(fftconv, "_INTERPRETER_TILE_COLUMNS", 64)
    plan = fftconv.fft_plan(21, rows_group=rows_group, keep_rows=rows_group == 1)
    fast = with_plan(plan)
    compare_with_reference(fast, causal_conv_reference, conv_inputs(1, 21, 9, 21, seed=2), TOL)


@pytest.mark.parametrize("keep", [False, True])
def test_causal_fft_conv_one_gradient(keep):
    """Only du, or only dk, asked for: the backward skips the other product (from recomputed or kept rows),
    batch 2."""
    plan = fftconv.fft_plan(30, keep_rows=keep)
    fast = with_plan(plan)
    inputs = conv_inputs(2, 30, 2, 30, seed=3)
    for name in ("u", "k"):
        compare_with_reference(fast, causal_conv_reference, inputs, TOL, grad_names=[name])


@pytest.mark.parametrize("options", [dict(joined_stores=True),
                                     dict(joined_stores=True, keep_rows=True),
                                     dict(folded_twiddles=True),
                                     dict(folded_twiddles=True, joined_stores=True, keep_rows=True,
                                          fft_size=16384, tile=512)])
def test_causal_fft_conv_spectral_staging_options(options):
    """FFTPlan.joined_stores (each complex tile stored as one [R2, R3, 2] pair) and folded_twiddles (the row
    twiddle inside per-row left factors): odd T, batch 2 (dk summed over the batch), from recomputed and kept rows,
    the 64 x 16 and 32 x 16 spectral tiles."""
    plan = fftconv.fft_plan(33, **options)
    fast = with_plan(plan)
    compare_with_reference(fast, causal_conv_reference, conv_inputs(2, 33, 3, 33, seed=5), TOL)


def test_causal_fft_conv_folded_twiddles_one_gradient():
    """folded_twiddles with only du or only dk asked for (the grad kernel's staging order differs per case)."""
    plan = fftconv.fft_plan(31, folded_twiddles=True, joined_stores=True)
    fast = with_plan(plan)
    inputs = conv_inputs(1, 31, 2, 20, seed=6)
    for name in ("u", "k"):
        compare_with_reference(fast, causal_conv_reference, inputs, TOL, grad_names=[name])


def test_causal_fft_conv_idft_channels():
    """FFTPlan.idft_channels = 32 (rows_idft into the time-major y and du in tiles of 32 channels): odd T, batch 2
    (dk summed over the batch), the interpreter's wide tiles."""
    plan = fftconv.fft_plan(33, idft_channels=32)
    u = torch.empty(2, 33, 3)
    assert fftconv._rows_launch(fftconv._Signal.time_major_of(u), plan, 32)[1]["JC"] == 32
    fast = with_plan(plan)
    compare_with_reference(fast, causal_conv_reference, conv_inputs(2, 33, 3, 33, seed=7), TOL)


@pytest.mark.parametrize("idft_channels", [32, 16])
def test_rows_idft_channels_gpu_tile(monkeypatch, idft_channels):
    """rows_idft alone with the GPU's 128-column tiles of FFTPlan.idft_channels (4 n23 x 32 channels, 8 x 16; k1 in
    steps of 16), batch 2, a partial last channel tile, odd T, against the inverse over n1 in float64:
    y[n1 M + n23] = (1/N) sum_{k1 <= R1/2} c_k1 Re(rows[k1, n23] e^{2 pi i n1 k1 / R1}), c = 1 at 0 and R1/2, else 2."""
    monkeypatch.setattr(fftconv, "_INTERPRETER_TILE_COLUMNS", 128)
    plan = fftconv.fft_plan(33, idft_channels=idft_channels)
    batch, length, channels, half = 2, 4093, 33, plan.half_rows
    y = torch.full((batch, length, channels), float("nan"))
    assert fftconv._rows_launch(fftconv._Signal.time_major_of(y), plan, idft_channels)[1]["J23"] == 128 // idft_channels
    rows = torch.randn(batch * channels, half + 1, 2, plan.m, generator=torch.Generator().manual_seed(8))
    fftconv.rows_idft(rows, fftconv._Signal.time_major_of(y), plan)
    spectrum = torch.complex(rows[:, :, 0].double(), rows[:, :, 1].double())  # [B C, R1/2 + 1, M]
    k1 = torch.arange(half + 1, dtype=torch.float64)
    weight = torch.full((half + 1,), 2.0, dtype=torch.float64)
    weight[0] = weight[half] = 1.0
    phase = torch.exp(2j * torch.pi * torch.outer(torch.arange(half, dtype=torch.float64), k1) / plan.r1)
    expected = torch.einsum("nk,gkm->gnm", phase * weight, spectrum).real / plan.n  # [B C, n1, M]
    expected = expected.reshape(batch, channels, half * plan.m)[:, :, :length].transpose(1, 2)
    error = (y.double() - expected).norm() / expected.norm()
    assert error <= TOL, f"relative error {error:.2e}"


def test_default_plan_keeps_rows_only_for_a_backward():
    u, k = torch.randn(1, 40, 2), torch.randn(2, 40)
    assert not fftconv.default_plan(u, k).keep_rows  # nothing requires grad
    assert fftconv.default_plan(u, k.requires_grad_()).keep_rows  # no device memory budget on CPU
    with torch.no_grad():
        assert not fftconv.default_plan(u, k).keep_rows
    with pytest.raises(ValueError, match="rows_group must be a power of two"):
        fftconv.fft_plan(40, rows_group=3)


def test_torch_fft_path_matches_direct_sum(monkeypatch):
    compare_with_reference(causal_fft_conv_torch, causal_conv_reference, conv_inputs(2, 101, 5, 60), TOL)
    # without CUDA and without the interpreter, causal_fft_conv is the torch.fft path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compare_with_reference(causal_fft_conv, causal_conv_reference, conv_inputs(1, 40, 2, 40), TOL)


def test_causal_fft_conv_rejects_bad_shapes():
    u = torch.randn(1, 10, 3)
    with pytest.raises(ValueError, match="Tk <= T"):
        causal_fft_conv(u, torch.randn(3, 11))
    with pytest.raises(ValueError, match="C = 3"):
        causal_fft_conv(u, torch.randn(4, 10))
    with pytest.raises(ValueError, match="u \\[B, T, C\\]"):
        causal_fft_conv(u[0], torch.randn(3, 10))
    with pytest.raises(ValueError, match="T <= 524288"):
        fftconv.fft_plan(600_000)
    with pytest.raises(ValueError, match="idft_channels must be None, 8, 16 or 32"):
        fftconv.fft_plan(100, idft_channels=4)


# --------------------------------------------------------------------------------------------------------- S4D


def s4d_params(H=3, N=4, seed=0):
    """Modes with |Abar| from ~0.6 to ~0.999 so that states carry across the test lengths."""
    gen = torch.Generator().manual_seed(seed)
    return {"log_dt": torch.empty(H).uniform_(-4, -1, generator=gen),
            "A_real_log": torch.log(torch.rand(H, N, generator=gen) * 0.5 + 0.05),
            "A_imag": torch.randn(H, N, generator=gen) * 3,
            "B": torch.randn(H, N, 2, generator=gen),
            "C": torch.randn(H, N, 2, generator=gen) / N**0.5}


def test_s4d_kernel_matches_recurrence():
    compare_with_reference(lambda **p: s4d_kernel(**p, length=75), lambda **p: s4d_kernel_reference(**p, length=75),
                           s4d_params(), TOL)


def test_s4d_ssm_initial_and_final_state():
    gen = torch.Generator().manual_seed(4)
    inputs = dict(u=torch.randn(2, 50, 3, generator=gen), **s4d_params(seed=4), D=torch.randn(3, generator=gen),
                  initial_state=torch.randn(2, 3, 4, 2, generator=gen))

    def run(ssm):
        return lambda **x: ssm(**x, output_final_state=True)

    compare_with_reference(run(s4d_ssm), run(s4d_ssm_reference), inputs, TOL)


def test_s4d_ssm_state_carries_across_segments():
    """Two segments, the first's final state entering the second, equal the recurrence over the whole sequence."""
    gen = torch.Generator().manual_seed(5)
    params = s4d_params(seed=5)
    inputs = dict(u=torch.randn(1, 60, 3, generator=gen), initial_state=torch.randn(1, 3, 4, 2, generator=gen),
                  **params)

    def two_segments(u, initial_state, **p):
        y1, state = s4d_ssm(u[:, :23], **p, initial_state=initial_state, output_final_state=True)
        y2, final = s4d_ssm(u[:, 23:], **p, initial_state=state, output_final_state=True)
        return torch.cat([y1, y2], dim=1), final

    def whole(u, initial_state, **p):
        return s4d_ssm_reference(u, **p, initial_state=initial_state, output_final_state=True)

    compare_with_reference(two_segments, whole, inputs, TOL)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_s4d_ssm_documents_reset(with_initial_state):
    """Packed documents (one of them empty) do not see each other; each starts from its own state."""
    gen = torch.Generator().manual_seed(6)
    cu_seqlens = torch.tensor([0, 9, 9, 40, 41, 70])
    inputs = dict(u=torch.randn(1, 70, 3, generator=gen) * 3, **s4d_params(seed=6),
                  initial_state=torch.randn(5, 3, 4, 2, generator=gen) if with_initial_state else None)

    def run(ssm):
        return lambda **x: ssm(**x, output_final_state=True, cu_seqlens=cu_seqlens)

    compare_with_reference(run(s4d_ssm), run(s4d_ssm_reference), inputs, TOL)


def test_s4d_transition_is_the_state_map():
    """final(x0) - final(0) = Abar^T x0, and Abar^L for a vector of lengths."""
    params = s4d_params(seed=7)
    u = torch.randn(1, 33, 3, dtype=torch.float64)
    x0 = torch.randn(1, 3, 4, 2, dtype=torch.float64)
    p64 = {n: t.double() for n, t in params.items()}
    _, with_x0 = s4d_ssm_reference(u, **p64, initial_state=x0, output_final_state=True)
    _, without = s4d_ssm_reference(u, **p64, output_final_state=True)
    transition = torch.view_as_complex(s4d_transition(params["log_dt"], params["A_real_log"], params["A_imag"], 33))
    mapped = torch.view_as_real(transition.to(torch.complex128) * torch.view_as_complex(x0[0]))
    torch.testing.assert_close(mapped, (with_x0 - without)[0], rtol=1e-5, atol=1e-6)
    several = s4d_transition(params["log_dt"], params["A_real_log"], params["A_imag"], torch.tensor([33, 0]))
    assert several.shape == (2, 3, 4, 2)
    torch.testing.assert_close(several[0], s4d_transition(params["log_dt"], params["A_real_log"],
                                                          params["A_imag"], 33))
    torch.testing.assert_close(several[1], torch.stack([torch.ones(3, 4), torch.zeros(3, 4)], -1))


def test_s4d_lin_init_is_a_stable_ssm():
    params = s4d_lin_init(3, 8, generator=torch.Generator().manual_seed(8))
    assert set(params) == {"log_dt", "A_real_log", "A_imag", "B", "C", "D"}
    transition = s4d_transition(params["log_dt"], params["A_real_log"], params["A_imag"], 1)
    assert bool((torch.linalg.vector_norm(transition, dim=-1) < 1).all())  # |Abar| < 1
    dt = params["log_dt"].exp()
    assert bool(((dt >= 1e-3) & (dt <= 1e-1)).all())
    y, _ = s4d_ssm(torch.randn(1, 20, 3), **params)
    assert y.shape == (1, 20, 3) and bool(torch.isfinite(y).all())


def test_s4d_rejects_bad_shapes():
    params = s4d_params()
    with pytest.raises(ValueError, match="B must be"):
        s4d_ssm(torch.randn(1, 5, 3), **{**params, "B": torch.randn(3, 4)})
    with pytest.raises(ValueError, match="initial_state must be"):
        s4d_ssm(torch.randn(2, 5, 3), **params, initial_state=torch.randn(1, 3, 4, 2))
    with pytest.raises(ValueError, match="batch must be 1"):
        s4d_ssm(torch.randn(2, 5, 3), **params, cu_seqlens=torch.tensor([0, 5]))
