"""Causal long convolution y = k * u by FFT: Triton kernels on tensor cores, and the torch.fft path.

    y[b, t, c] = sum_{j <= t} k[c, t - j] u[b, j, c]        u [B, T, C], k [C, Tk] with Tk <= T

The convolution is linear (not circular) when u and k are zero-padded to an FFT size N >= 2T:
y = first T samples of IDFT_N(DFT_N(u) * DFT_N(k)). The backward is again two such products:

    du = first T  of IDFT_N(DFT_N(dy) * conj(DFT_N(k)))        (anti-causal correlation with k)
    dk = first Tk of IDFT_N(sum_b DFT_N(dy_b) * conj(DFT_N(u_b)))  (correlation of u with dy)

(the zero padding makes the wrapped lags t - j < 0 read zeros, so circular correlation equals the linear one).

Triton path (the FlashFFTConv idea, Fu et al. 2023: the DFT as products with small DFT matrices on tensor cores,
adapted to lctrain's time-major [B, T, C] layout). N = R1 * R2 * R3, all powers of two; index the padded signal
n = M n1 + R3 n2 + n3 (M = R2 R3) and the frequency k = k1 + R1 (k2 + R2 k3). Then (Cooley-Tukey, four-step form)

    X[k] = sum_{n2,n3} W_{R3}^{n3 k3} W_M^{n3 k2} W_{R2}^{n2 k2} W_N^{k1 (R3 n2 + n3)} A[k1, n2, n3],
    A[k1, n23]  = sum_{n1} W_{R1}^{n1 k1} x[n1, n23],           W_R = exp(-2 pi i / R).

Three kernels, two trips through global memory per direction:
  1. ``_rows_dft_kernel``   A = DFT over n1 (a GEMM with an [R1/2, R1/2] cos/sin table: x is real and zero for
     n1 >= R1/2). x real means A[R1 - k1] = conj(A[k1]), so only rows k1 = 0..R1/2 are kept: the row buffer
     [G, R1/2 + 1, 2 (re, im), M] float32 holds N/2 + M complex values per channel, not N.
  2. ``_spectral_*_kernel`` one program per (row k1, group of channels): the 2-D DFT over (n2, n3) of each row is
     F_R2 (A tw) F_R3 -- two small complex matrix products on tensor cores with twiddles between --, then the
     pointwise product of the spectra, then the inverse 2-D DFT, written back in place. The spectra never leave
     the chip; rows k1 <= R1/2 cover every frequency up to conjugation (k mod R1 <= R1/2), and products of
     Hermitian spectra stay Hermitian, so the halved rows suffice.
  3. ``_rows_idft_kernel``  y = (1/N) sum_{k1} W_{R1}^{-n1 k1} A'[k1] for n1 < R1/2 only (the first T >= outputs),
     written as the real GEMM  y = Mc Re A' + Ms Im A'  with c_{k1} = 2 for the conjugate pairs.

DFT matrices and twiddles are built in the kernels from cos/sin of exact integer phases (k n mod R); the small
rows-stage tables are built once per size in float64. Tensor-core operands are float32 (tf32 on GPUs, 10-bit
mantissa: the relative error of a conv is about 1e-3; the CPU interpreter multiplies in exact float32); inputs may
be bfloat16 or float32, every accumulation and every intermediate is float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from ..common import new_output, use_triton

MIN_FFT_SIZE = 1 << 13  # smallest N = R1 R2 R3 with every matrix dimension >= 16 (tl.dot's minimum)
MAX_FFT_SIZE = 1 << 20  # T <= 524288; the rows stage's cost grows with R1 = N / 1024 beyond N = 2^17
_TILE_SHAPES = {256: (16, 16), 512: (32, 16), 1024: (32, 32), 2048: (64, 32)}  # M -> (R2, R3)


@dataclasses.dataclass(frozen=True)
class FFTPlan:
    """N = r1 * r2 * r3. The signal fills the first r1 / 2 of the r1 outer rows (N >= 2T)."""

    n: int
    r1: int
    r2: int
    r3: int

    @property
    def m(self) -> int:
        return self.r2 * self.r3

    @property
    def half_rows(self) -> int:
        return self.r1 // 2


def fft_plan(length: int, fft_size: int | None = None, tile: int = 1024) -> FFTPlan:
    """The FFT size for a causal conv of ``length`` samples: the next power of two >= 2 * length (at least 2^13).

    ``tile`` = R2 * R3 is the size of the 2-D DFT each spectral program holds (256 .. 2048); ``fft_size`` forces N
    (tests use it to exercise every plan at small T).
    """
    n = fft_size or max(MIN_FFT_SIZE, 1 << max(0, (2 * length - 1).bit_length()))
    if n < 2 * length or n & (n - 1) or n < MIN_FFT_SIZE:
        raise ValueError(f"FFT size must be a power of two in [{MIN_FFT_SIZE}, {MAX_FFT_SIZE}] and >= 2T; "
                         f"got {n} for T={length}")
    if n > MAX_FFT_SIZE:
        raise ValueError(f"causal_fft_conv's Triton path supports T <= {MAX_FFT_SIZE // 2}; got T={length}")
    m = min(tile, n // 32)
    r2, r3 = _TILE_SHAPES[m]
    return FFTPlan(n=n, r1=n // m, r2=r2, r3=r3)


@functools.lru_cache(maxsize=None)
def _rows_tables(r1: int, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """[R1/2, R1/2] float32 tables for the rows stages, computed in float64.

    forward  A[k1] = sum_{n1 < R1/2} x[n1] (cos - i sin)(2 pi k1 n1 / R1)         -> (cos, -sin)[k1, n1]
    inverse  y[n1] = (1/N) sum_{k1 < R1/2} c_k1 Re(A'[k1] e^{+2 pi i n1 k1 / R1})  -> (c cos / N, -c sin / N)[n1, k1]
             with c_0 = 1, c_k1 = 2 (A'[k1] and its conjugate A'[R1 - k1]); row R1/2 is added separately.
    """
    h = r1 // 2
    idx = torch.arange(h, dtype=torch.float64)
    phase = 2 * math.pi * torch.outer(idx, idx).remainder(r1) / r1
    weight = torch.full((h,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    tables = (torch.cos(phase), -torch.sin(phase), torch.cos(phase) * weight / n, -torch.sin(phase) * weight / n)
    return tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in tables)


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _column_tile(tile, channels, M, J23: tl.constexpr, JC: tl.constexpr, CHANNEL_FASTEST: tl.constexpr):
    """Columns of a rows-stage tile: J23 consecutive n23 times JC consecutive channels, flattened to J23 * JC.

    CHANNEL_FASTEST orders the flat index channel-first (coalesced for the time-major [T, C] tensors) or
    n23-first (for the channel-major rows buffer and k)."""
    j = tl.arange(0, J23 * JC)
    if CHANNEL_FASTEST:
        n23_local, c_local = j // JC, j % JC
    else:
        n23_local, c_local = j % J23, j // J23
    n23_tiles = M // J23
    n23 = (tile % n23_tiles) * J23 + n23_local
    c = (tile // n23_tiles) * JC + c_local
    return n23, c, c < channels


@triton.jit
def _rows_dft_kernel(x_ptr, rows_ptr, cos_ptr, nsin_ptr, length, channels, stride_b, stride_t, stride_c, M, R1H,
                     BM: tl.constexpr, BK: tl.constexpr, J23: tl.constexpr, JC: tl.constexpr,
                     CHANNEL_FASTEST: tl.constexpr):
    """rows[g, k1] = sum_{n1 < R1/2} x[n1 M + n23] W_R1^{n1 k1} for k1 in [0, R1/2], g = b * channels + c."""
    ROW_BLOCKS = R1H // BM
    pid = tl.program_id(0)
    b = tl.program_id(1)
    row_block = pid % ROW_BLOCKS
    n23, c, col_ok = _column_tile(pid // ROW_BLOCKS, channels, M, J23, JC, CHANNEL_FASTEST)
    k1 = row_block * BM + tl.arange(0, BM)
    x_cols = x_ptr + b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c
    acc_re = tl.zeros([BM, J23 * JC], dtype=tl.float32)
    acc_im = tl.zeros([BM, J23 * JC], dtype=tl.float32)
    nyquist = tl.zeros([J23 * JC], dtype=tl.float32)  # row k1 = R1/2: sum_n1 (-1)^n1 x[n1], real
    for start in range(0, R1H, BK):
        n1 = start + tl.arange(0, BK)
        t = n1[:, None] * M + n23[None, :]
        x = tl.load(x_cols[None, :] + t.to(tl.int64) * stride_t, mask=(t < length) & col_ok[None, :],
                    other=0.0).to(tl.float32)
        table = k1[:, None] * R1H + n1[None, :]
        acc_re = tl.dot(tl.load(cos_ptr + table), x, acc_re)
        acc_im = tl.dot(tl.load(nsin_ptr + table), x, acc_im)
        nyquist += tl.sum(x * (1 - 2 * (n1 % 2)).to(tl.float32)[:, None], axis=0)
    row0 = rows_ptr + (b * channels + c).to(tl.int64) * ((R1H + 1) * 2 * M) + n23
    out = row0[None, :] + k1[:, None] * (2 * M)
    tl.store(out, acc_re, mask=col_ok[None, :])
    tl.store(out + M, acc_im, mask=col_ok[None, :])
    last = col_ok & (n23 * 0 + row_block == 0)  # (a vector mask: the interpreter rejects scalar & vector)
    tl.store(row0 + R1H * 2 * M, nyquist, mask=last)
    tl.store(row0 + R1H * 2 * M + M, tl.zeros_like(nyquist), mask=last)


@triton.jit
def _rows_idft_kernel(rows_ptr, y_ptr, mc_ptr, ms_ptr, length, channels, stride_b, stride_t, stride_c, N, M, R1H,
                      BM: tl.constexpr, BK: tl.constexpr, J23: tl.constexpr, JC: tl.constexpr,
                      CHANNEL_FASTEST: tl.constexpr):
    """y[n1 M + n23] = (1/N) sum_{k1 <= R1/2} c_k1 Re(rows[g, k1, n23] e^{2 pi i n1 k1 / R1}) for n1 < R1/2."""
    ROW_BLOCKS = R1H // BM
    pid = tl.program_id(0)
    b = tl.program_id(1)
    row_block = pid % ROW_BLOCKS
    n23, c, col_ok = _column_tile(pid // ROW_BLOCKS, channels, M, J23, JC, CHANNEL_FASTEST)
    n1 = row_block * BM + tl.arange(0, BM)
    row0 = rows_ptr + (b * channels + c).to(tl.int64) * ((R1H + 1) * 2 * M) + n23
    acc = tl.zeros([BM, J23 * JC], dtype=tl.float32)
    for start in range(0, R1H, BK):
        k1 = start + tl.arange(0, BK)
        src = row0[None, :] + k1[:, None] * (2 * M)
        a_re = tl.load(src, mask=col_ok[None, :], other=0.0)
        a_im = tl.load(src + M, mask=col_ok[None, :], other=0.0)
        table = n1[:, None] * R1H + k1[None, :]
        acc = tl.dot(tl.load(mc_ptr + table), a_re, acc)
        acc = tl.dot(tl.load(ms_ptr + table), a_im, acc)
    nyquist = tl.load(row0 + R1H * 2 * M, mask=col_ok, other=0.0)
    acc += ((1 - 2 * (n1 % 2)).to(tl.float32) * (1.0 / N))[:, None] * nyquist[None, :]
    t = n1[:, None] * M + n23[None, :]
    dst = y_ptr + b.to(tl.int64) * stride_b + c.to(tl.int64)[None, :] * stride_c + t.to(tl.int64) * stride_t
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=(t < length) & col_ok[None, :])


@triton.jit
def _unit_phases(rows, cols, R):
    """exp(-2 pi i (rows * cols mod R) / R) as (re, im): exact integer phases, so no error grows with R."""
    phase = ((rows * cols) % R).to(tl.float32) * (6.283185307179586 / R)
    return tl.cos(phase), -tl.sin(phase)


# Complex products are written out (re, im) inline: the interpreter pays ~2 ms per call of a jitted helper.


@triton.jit
def _row_spectrum(ar, ai, twr, twi, f2r, f2i, tir, tii, f3r, f3i):
    """X = ((F_R2 @ (a * tw_row)) * tw_inner) @ F_R3 for one row k1: the 2-D DFT over (n2, n3), output [k2, k3]."""
    xr = ar * twr - ai * twi
    xi = ar * twi + ai * twr
    br = tl.dot(f2r, xr, tl.dot(-f2i, xi))
    bi = tl.dot(f2r, xi, tl.dot(f2i, xr))
    cr = br * tir - bi * tii
    ci = br * tii + bi * tir
    return tl.dot(cr, f3r, tl.dot(ci, -f3i)), tl.dot(cr, f3i, tl.dot(ci, f3r))


@triton.jit
def _row_inverse(yr, yi, twr, twi, f2r, f2i, tir, tii, f3r, f3i):
    """The adjoint of _row_spectrum (every factor conjugated, in reverse order); the 1/N is in the rows stage."""
    cr = tl.dot(yr, f3r, tl.dot(yi, f3i))
    ci = tl.dot(yi, f3r, tl.dot(yr, -f3i))
    br = cr * tir + ci * tii
    bi = ci * tir - cr * tii
    xr = tl.dot(f2r, br, tl.dot(f2i, bi))
    xi = tl.dot(f2r, bi, tl.dot(-f2i, br))
    return xr * twr + xi * twi, xi * twr - xr * twi


@triton.jit
def _row_factors(k1, N, R2: tl.constexpr, R3: tl.constexpr):
    """Row k1's twiddle W_N^{k1 n23}, the inner twiddle W_M^{k2 n3}, F_R2 and F_R3, each as (re, im)."""
    i2 = tl.arange(0, R2)
    i3 = tl.arange(0, R3)
    twr, twi = _unit_phases(k1, i2[:, None] * R3 + i3[None, :], N)
    tir, tii = _unit_phases(i2[:, None], i3[None, :], R2 * R3)
    f2r, f2i = _unit_phases(i2[:, None], i2[None, :], R2)
    f3r, f3i = _unit_phases(i3[:, None], i3[None, :], R3)
    return twr, twi, f2r, f2i, tir, tii, f3r, f3i


@triton.jit
def _spectral_product_kernel(u_rows, k_rows, batch, channels, batch_stride, channels_per_program, N, SEQ,
                             R2: tl.constexpr, R3: tl.constexpr):
    """Row k1 of every (b, c): u_rows <- IDFT2(DFT2(u_rows) * DFT2(k_rows[c])), in place."""
    M: tl.constexpr = R2 * R3
    k1 = tl.program_id(0)
    c_lo = tl.program_id(1) * channels_per_program
    c_hi = tl.minimum(c_lo + channels_per_program, channels)
    twr, twi, f2r, f2i, tir, tii, f3r, f3i = _row_factors(k1, N, R2, R3)
    tile = tl.arange(0, R2)[:, None] * R3 + tl.arange(0, R3)[None, :]
    row = c_lo.to(tl.int64) * SEQ + k1 * (2 * M) + tile  # pointers advance by steps < 2^31: no int32 overflow
    kp = k_rows + row
    uc = u_rows + row
    for _ in range(c_lo, c_hi):
        kr, ki = _row_spectrum(tl.load(kp), tl.load(kp + M), twr, twi, f2r, f2i, tir, tii, f3r, f3i)
        up = uc
        for _ in range(batch):
            ur, ui = _row_spectrum(tl.load(up), tl.load(up + M), twr, twi, f2r, f2i, tir, tii, f3r, f3i)
            yr, yi = _row_inverse(ur * kr - ui * ki, ur * ki + ui * kr, twr, twi, f2r, f2i, tir, tii, f3r, f3i)
            tl.store(up, yr)
            tl.store(up + M, yi)
            up += batch_stride
        kp += SEQ
        uc += SEQ


@triton.jit
def _spectral_grad_kernel(dy_rows, u_rows, k_rows, batch, channels, batch_stride, channels_per_program, N, SEQ,
                          R2: tl.constexpr, R3: tl.constexpr, NEED_DU: tl.constexpr, NEED_DK: tl.constexpr):
    """Row k1: dy_rows <- IDFT2(DY conj(K)) (du), k_rows <- IDFT2(sum_b DY_b conj(U_b)) (dk), in place."""
    M: tl.constexpr = R2 * R3
    k1 = tl.program_id(0)
    c_lo = tl.program_id(1) * channels_per_program
    c_hi = tl.minimum(c_lo + channels_per_program, channels)
    twr, twi, f2r, f2i, tir, tii, f3r, f3i = _row_factors(k1, N, R2, R3)
    tile = tl.arange(0, R2)[:, None] * R3 + tl.arange(0, R3)[None, :]
    row = c_lo.to(tl.int64) * SEQ + k1 * (2 * M) + tile
    kp = k_rows + row
    dyc = dy_rows + row
    uc = u_rows + row
    for _ in range(c_lo, c_hi):
        if NEED_DU:
            kr, ki = _row_spectrum(tl.load(kp), tl.load(kp + M), twr, twi, f2r, f2i, tir, tii, f3r, f3i)
        dkr = tl.zeros([R2, R3], dtype=tl.float32)
        dki = tl.zeros([R2, R3], dtype=tl.float32)
        dp = dyc
        up = uc
        for _ in range(batch):
            gr, gi = _row_spectrum(tl.load(dp), tl.load(dp + M), twr, twi, f2r, f2i, tir, tii, f3r, f3i)
            if NEED_DU:
                dur, dui = _row_inverse(gr * kr + gi * ki, gi * kr - gr * ki,  # DY conj(K)
                                         twr, twi, f2r, f2i, tir, tii, f3r, f3i)
                tl.store(dp, dur)
                tl.store(dp + M, dui)
            if NEED_DK:
                ur, ui = _row_spectrum(tl.load(up), tl.load(up + M), twr, twi, f2r, f2i, tir, tii, f3r, f3i)
                dkr += gr * ur + gi * ui  # DY conj(U)
                dki += gi * ur - gr * ui
            dp += batch_stride
            up += batch_stride
        if NEED_DK:
            dkr, dki = _row_inverse(dkr, dki, twr, twi, f2r, f2i, tir, tii, f3r, f3i)
            tl.store(kp, dkr)
            tl.store(kp + M, dki)
        kp += SEQ
        dyc += SEQ
        uc += SEQ


# ------------------------------------------------------------------------------------------------- launchers


@dataclasses.dataclass(frozen=True)
class _Signal:
    """A batch of real signals x[b, c, t] = data[b * stride_b + t * stride_t + c * stride_c], t < length."""

    data: torch.Tensor
    batch: int
    channels: int
    length: int
    stride_b: int
    stride_t: int
    stride_c: int

    @property
    def time_major(self) -> bool:
        return self.stride_c == 1

    @staticmethod
    def time_major_of(x: torch.Tensor) -> "_Signal":  # [B, T, C]
        return _Signal(x, x.shape[0], x.shape[2], x.shape[1], x.shape[1] * x.shape[2], x.shape[2], 1)

    @staticmethod
    def channel_major_of(x: torch.Tensor) -> "_Signal":  # [C, T]
        return _Signal(x, 1, x.shape[0], x.shape[1], 0, 1, x.shape[1])


_INTERPRETER_TILE_COLUMNS = 4096  # few, wide programs: the interpreter pays per program and per op, not per element


def _rows_launch(signal: _Signal, plan: FFTPlan):
    """Grid and tile constants shared by the two rows kernels.

    On GPUs a tile is 128 columns: 8 consecutive n23 (one 32-byte sector of a row) times 16 channels (64 bytes of a
    time-major [T, C] row), or 128 consecutive n23 of one channel for channel-major signals.
    """
    columns = 128 if signal.data.is_cuda else min(_INTERPRETER_TILE_COLUMNS, plan.m * 16)
    j23, jc = (columns // 16, 16) if signal.time_major else (min(columns, plan.m), 1)
    bm = bk = min(plan.half_rows, 64)
    tiles = (plan.m // j23) * triton.cdiv(signal.channels, jc)
    grid = (tiles * (plan.half_rows // bm), signal.batch)
    meta = dict(BM=bm, BK=bk, J23=j23, JC=jc, CHANNEL_FASTEST=signal.time_major, num_warps=8)
    return grid, meta


def rows_dft(signal: _Signal, plan: FFTPlan) -> torch.Tensor:
    """The first stage: [B * C, R1/2 + 1, 2, M] float32 rows of the half spectrum over n1."""
    rows = new_output((signal.batch * signal.channels, plan.half_rows + 1, 2, plan.m), torch.float32,
                      signal.data.device)
    cos, nsin, _, _ = _rows_tables(plan.r1, plan.n, signal.data.device)
    grid, meta = _rows_launch(signal, plan)
    _rows_dft_kernel[grid](signal.data, rows, cos, nsin, signal.length, signal.channels, signal.stride_b,
                           signal.stride_t, signal.stride_c, plan.m, plan.half_rows, **meta)
    return rows


def rows_idft(rows: torch.Tensor, out: _Signal, plan: FFTPlan) -> None:
    """The last stage: writes the first ``out.length`` samples of the real inverse into ``out.data``."""
    _, _, mc, ms = _rows_tables(plan.r1, plan.n, rows.device)
    grid, meta = _rows_launch(out, plan)
    _rows_idft_kernel[grid](rows, out.data, mc, ms, out.length, out.channels, out.stride_b, out.stride_t,
                            out.stride_c, plan.n, plan.m, plan.half_rows, **meta)


def _spectral_grid(plan: FFTPlan, channels: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """Groups of channels per program: enough programs to fill the GPU, few large ones under the interpreter."""
    rows = plan.half_rows + 1
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        per_program = max(1, min(16, channels * rows // target))
    else:
        per_program = channels
    return (rows, triton.cdiv(channels, per_program)), per_program


def spectral_product(u_rows: torch.Tensor, k_rows: torch.Tensor, batch: int, channels: int, plan: FFTPlan):
    grid, per_program = _spectral_grid(plan, channels, u_rows.device)
    _spectral_product_kernel[grid](u_rows, k_rows, batch, channels, u_rows[0].numel() * channels, per_program,
                                   plan.n, u_rows[0].numel(), R2=plan.r2, R3=plan.r3, num_warps=4)


def spectral_grad(dy_rows, u_rows, k_rows, batch: int, channels: int, plan: FFTPlan, need_du: bool, need_dk: bool):
    grid, per_program = _spectral_grid(plan, channels, dy_rows.device)
    _spectral_grad_kernel[grid](dy_rows, u_rows if need_dk else dy_rows, k_rows, batch, channels,
                                dy_rows[0].numel() * channels, per_program, plan.n, dy_rows[0].numel(),
                                R2=plan.r2, R3=plan.r3, NEED_DU=need_du,
                                NEED_DK=need_dk, num_warps=4)


class CausalFFTConvFunction(torch.autograd.Function):
    """u [B, T, C], k [C, Tk] -> y [B, T, C] in ``out_dtype`` (u's dtype when None)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, plan: FFTPlan, out_dtype: torch.dtype | None = None):
        u, k = u.contiguous(), k.contiguous()
        batch, length, channels = u.shape
        u_rows = rows_dft(_Signal.time_major_of(u), plan)
        k_rows = rows_dft(_Signal.channel_major_of(k), plan)
        spectral_product(u_rows, k_rows, batch, channels, plan)
        y = new_output(u.shape, out_dtype or u.dtype, u.device)
        rows_idft(u_rows, _Signal.time_major_of(y), plan)
        ctx.save_for_backward(u, k)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        u, k = ctx.saved_tensors
        plan = ctx.plan
        need_du, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        batch, length, channels = u.shape
        dy = dy.contiguous()
        dy_rows = rows_dft(_Signal.time_major_of(dy), plan)
        u_rows = rows_dft(_Signal.time_major_of(u), plan) if need_dk else None
        k_signal = _Signal.channel_major_of(k)
        # K's spectrum is needed for du only; without it the buffer just receives dk
        k_rows = rows_dft(k_signal, plan) if need_du else torch.empty_like(dy_rows[:channels])
        spectral_grad(dy_rows, u_rows, k_rows, batch, channels, plan, need_du, need_dk)
        du = dk = None
        if need_du:
            du = new_output(u.shape, u.dtype, u.device)
            rows_idft(dy_rows, _Signal.time_major_of(du), plan)
        if need_dk:
            dk = new_output(k.shape, k.dtype, k.device)
            rows_idft(k_rows, _Signal.channel_major_of(dk), plan)
        return du, dk, None, None


# --------------------------------------------------------------------------------------------- public entry


def causal_fft_conv_torch(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The torch.fft path (rfft, multiply, irfft at N = 2T): the fallback and the peer in benchmarks.

    Computes in float64 for float64 inputs, else float32; returns u's dtype. Differentiable through torch.fft.
    """
    length = u.shape[1]
    dtype = torch.promote_types(torch.promote_types(u.dtype, k.dtype), torch.float32)
    n = 2 * length
    spectrum = torch.fft.rfft(u.to(dtype), n=n, dim=1) * torch.fft.rfft(k.to(dtype), n=n, dim=1).t()
    return torch.fft.irfft(spectrum, n=n, dim=1)[:, :length].to(u.dtype)


def _check(u: torch.Tensor, k: torch.Tensor) -> None:
    if u.dim() != 3 or k.dim() != 2:
        raise ValueError(f"causal_fft_conv takes u [B, T, C] and k [C, Tk]; got {tuple(u.shape)} and {tuple(k.shape)}")
    if k.shape[0] != u.shape[2] or not 1 <= k.shape[1] <= u.shape[1]:
        raise ValueError(f"k must be [C, Tk] with C = {u.shape[2]} and 1 <= Tk <= T = {u.shape[1]}; "
                         f"got {tuple(k.shape)}")
    allowed = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if u.dtype not in allowed or k.dtype not in allowed:
        raise ValueError(f"causal_fft_conv takes floating inputs {allowed}; got {u.dtype} and {k.dtype}")


def causal_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_{j <= t} k[c, t - j] u[b, j, c]: a causal convolution per channel, by FFT.

    u: [B, T, C] (float32, bfloat16 or float16); k: [C, Tk] with 1 <= Tk <= T, taps Tk.. T-1 read as zero.
    Returns y [B, T, C] in u's dtype; differentiable in u and k (dk in k's dtype). Any T >= 1 up to 524288.

    Where ``use_triton(u)``: the Triton kernels at FFT size N = max(2^13, next power of two >= 2T) (the padding is
    free of charge in memory, it only costs compute: T = 2^j + 1 does twice the work of T = 2^j), float32
    intermediates and tf32 tensor-core products (relative error ~1e-3 on GPUs; float64 inputs are computed in
    float32 there). Elsewhere: ``causal_fft_conv_torch``.
    """
    _check(u, k)
    if use_triton(u):
        return CausalFFTConvFunction.apply(u, k, fft_plan(u.shape[1]), None)
    return causal_fft_conv_torch(u, k)
