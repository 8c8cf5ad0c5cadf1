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

Sizes: N = max(2^13, next power of two >= 2T); the spectral tile R2 x R3 = 64 x 16 (M = 1024; 16 x 16 and 32 x 16
below N = 2^15), R1 = N / M. Per complex element of the row buffer a transform costs 2 R1 real flops in the rows
stage and 8 (R2 + R3) in the spectral stage. DFT matrices and twiddles are float32 tables built in float64 from
exact integer phases (k n mod R). Tensor-core operands are float32 (tf32 on GPUs, 10-bit mantissa, through six
transform stages: relative error 4.6e-3 measured on an H100 at T = 65536 for y, du and dk; the CPU interpreter
multiplies in exact float32); inputs may be bfloat16 or float32, every accumulation and every intermediate is
float32. The memory traffic: with X the bytes of one float32 [T, C] signal,
the forward moves 15 X (u, k read; two row buffers of 2 X written and read; y written) and the backward 25 X;
keeping the row buffers (FFTPlan.keep_rows) makes it 15 X + 19 X.
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
MAX_FFT_SIZE = 1 << 20  # T <= 524288; the rows stage's flops grow with R1 = N / 1024
# M -> (R2, R3): R2 = 64 rows for the 4-warp wgmma tile (64 x 32 spills at 255 registers in the compiled SASS)
_TILE_SHAPES = {256: (16, 16), 512: (32, 16), 1024: (64, 16)}


@dataclasses.dataclass(frozen=True)
class FFTPlan:
    """N = r1 * r2 * r3. The signal fills the first r1 / 2 of the r1 outer rows (N >= 2T).

    keep_rows: see CausalFFTConvFunction. rows_group: the rows stages walk their tiles in groups of
    this many consecutive n23 tiles, the channel tile fastest inside a group (see _tile_origin). rows_maxnreg: a
    register cap per thread for the rows kernels (None: the compiler's choice); 128 makes sure two programs of 8
    warps fit an SM (triton 3.9 compiles them to 140-178 registers, one program; no spills at 128). (Caps of 168
    and 128 on the spectral kernels, 3 and 4 programs per SM, measured 0-3% slower on an H100.) joined_stores: the
    spectral kernels store each complex output tile (re and im planes) with one store of the joined pair, so its
    conversion from the accumulator layout goes through shared memory once, not twice (sm_90 SASS: 2 barriers
    fewer per product item, 4 per grad item; see _store_complex). folded_twiddles: the row twiddle folds into
    per-row left factors (_folded_row_factors), so an item's loaded tiles are staged as tensor-core operands with
    no register arithmetic, and the kernels load an item's tiles (the grad: dy's and k's) before its first product,
    so that they share one shared-memory round trip (sm_90 SASS, loop barriers per product / grad item: 10 / 18
    default, 8 / 14 joined_stores, 8 / 16 folded_twiddles, 6 / 12 both; 232-255 registers instead of 164-190, 2
    programs per SM instead of 3 for the product). idft_channels: None, or the channels of a rows_idft tile into a
    time-major output ([T, C]: y, du) of 128 columns, 128 / idft_channels n23 x idft_channels (8, 16 or 32; see
    _rows_launch). 32: each warp store covers 4 whole 128-byte lines of 4 consecutive tokens (as a channel-major
    output's tile does) instead of one 32-byte sector in each of 16 lines 8 KB apart, and the rows buffer is read
    in 16-byte halves of sectors; 16: half lines written, whole sectors read; 8: the default's pieces in the wider
    launch (the controls that tell the written and the read granularity apart)."""

    n: int
    r1: int
    r2: int
    r3: int
    keep_rows: bool = False
    rows_group: int = 16
    rows_maxnreg: int | None = 128
    joined_stores: bool = False
    folded_twiddles: bool = False
    idft_channels: int | None = None

    @property
    def m(self) -> int:
        return self.r2 * self.r3

    @property
    def half_rows(self) -> int:
        return self.r1 // 2

    @property
    def spectral_warps(self) -> int:
        """16 rows of the [R2, R3] tile per warp. Triton lays out chained dots with all warps along the rows: fewer
        than 16 rows per warp would compute every tensor-core product twice (or 4 times), as the SASS shows."""
        return self.r2 // 16


def fft_plan(length: int, fft_size: int | None = None, tile: int = 1024, keep_rows: bool = False,
             rows_group: int = 16, rows_maxnreg: int | None = 128,
             joined_stores: bool = False, folded_twiddles: bool = False, idft_channels: int | None = None) -> FFTPlan:
    """The FFT size for a causal conv of ``length`` samples: the next power of two >= 2 * length (at least 2^13).

    ``tile`` = R2 * R3 is the size of the 2-D DFT each spectral program holds (256, 512 or 1024); ``fft_size``
    forces N (tests use it to exercise every plan at small T); the other options: see FFTPlan.
    """
    n = fft_size or max(MIN_FFT_SIZE, 1 << max(0, (2 * length - 1).bit_length()))
    if n < 2 * length or n & (n - 1) or n < MIN_FFT_SIZE:
        raise ValueError(f"FFT size must be a power of two in [{MIN_FFT_SIZE}, {MAX_FFT_SIZE}] and >= 2T; "
                         f"got {n} for T={length}")
    if n > MAX_FFT_SIZE:
        raise ValueError(f"causal_fft_conv's Triton path supports T <= {MAX_FFT_SIZE // 2}; got T={length}")
    m = min(tile, n // 32)
    r2, r3 = _TILE_SHAPES[m]
    if rows_group < 1 or rows_group & (rows_group - 1):
        raise ValueError(f"rows_group must be a power of two >= 1; got {rows_group}")
    if idft_channels not in (None, 8, 16, 32):
        raise ValueError(f"idft_channels must be None, 8, 16 or 32; got {idft_channels}")
    return FFTPlan(n=n, r1=n // m, r2=r2, r3=r3, keep_rows=keep_rows,
                   rows_group=rows_group, rows_maxnreg=rows_maxnreg, joined_stores=joined_stores,
                   folded_twiddles=folded_twiddles, idft_channels=idft_channels)


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


@functools.lru_cache(maxsize=None)
def _spectral_tables(n: int, r1: int, r2: int, r3: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tables of the spectral stage, computed in float64 (exact integer phases):

    factors      F_R2 [2, R2, R2], F_R3 [2, R3, R3], tw_inner [2, R2, R3] = W_M^{k2 n3}, back to back;
    row twiddles [R1/2 + 1, 2, R2, R3] = W_N^{k1 (R3 n2 + n3)}.  (W_R = exp(-2 pi i / R); planes re, im.)
    """
    def unit(phase_numerator: torch.Tensor, r: int) -> torch.Tensor:
        phase = 2 * math.pi * phase_numerator.remainder(r) / r
        return torch.stack([torch.cos(phase), -torch.sin(phase)])

    i2, i3 = torch.arange(r2, dtype=torch.float64), torch.arange(r3, dtype=torch.float64)
    k1 = torch.arange(r1 // 2 + 1, dtype=torch.float64)
    n23 = (i2[:, None] * r3 + i3[None, :]).flatten()
    factors = torch.cat([unit(torch.outer(i2, i2), r2).flatten(), unit(torch.outer(i3, i3), r3).flatten(),
                         unit(torch.outer(i2, i3), r2 * r3).flatten()])
    rows = unit(torch.outer(k1, n23), n).transpose(0, 1)
    return (factors.to(device=device, dtype=torch.float32).contiguous(),
            rows.to(device=device, dtype=torch.float32).contiguous())


@functools.lru_cache(maxsize=None)
def _folded_tables(n: int, r1: int, r2: int, r3: int, device: torch.device) -> torch.Tensor:
    """float32 [R1/2 + 1, 2 R2 R2 + 2 R2 R3] (FFTPlan.folded_twiddles), computed in float64 from exact integer
    phases: per row k1, F_R2 diag(d2) [2, R2, R2] then tw_inner * d3 [2, R2, R3], with the row twiddle
    W_N^{k1 (R3 n2 + n3)} = d2[n2] d3[n3] (see _folded_row_factors); W_R2 = W_N^{R1 R3}, W_M = W_N^{R1}."""
    k1 = torch.arange(r1 // 2 + 1, dtype=torch.float64)[:, None, None]
    i2, i3 = torch.arange(r2, dtype=torch.float64), torch.arange(r3, dtype=torch.float64)

    def unit(phase_numerator: torch.Tensor) -> torch.Tensor:  # [K1, A, B] -> [K1, 2 A B]
        phase = 2 * math.pi * phase_numerator.remainder(n) / n
        return torch.stack([torch.cos(phase), -torch.sin(phase)], 1).flatten(1)

    left = unit(r1 * r3 * torch.outer(i2, i2)[None] + r3 * k1 * i2[None, None, :])
    inner = unit(r1 * torch.outer(i2, i3)[None] + k1 * i3[None, None, :])
    return torch.cat([left, inner], 1).to(device=device, dtype=torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_origin(tile, M, channels, group, J23: tl.constexpr, JC: tl.constexpr):
    """A rows-stage tile covers J23 consecutive n23 times JC consecutive channels: its first (n23, channel).

    Tiles come in groups of ``group`` consecutive n23 tiles (a power of two dividing M / J23), the n23 tile fastest
    inside a group, then the channel tile: the programs running at one time cover a block of about group J23 n23
    by (resident programs / group) JC channels, so both the time-major side (contiguous along channels) and the
    rows buffer (contiguous along n23) are read or written in runs longer than one tile's 32 bytes."""
    per_group = group * tl.cdiv(channels, JC)
    within = tile % per_group
    return ((tile // per_group) * group + within % group) * J23, (within // group) * JC


# The two rows kernels transpose on the way in: each loads its 3-D tile with the memory-contiguous axis last
# (channels for a time-major [T, C] signal, n23 for the rows buffer and for [C, T] signals), then permutes and
# flattens it into the matrix operand, whose columns are ordered as the kernel's output is contiguous. The
# reordering rides on the operand's trip through shared memory; loads and stores both move whole sectors.


@triton.jit
def _rows_dft_kernel(x_ptr, rows_ptr, cos_ptr, nsin_ptr, length, channels, stride_b, stride_t, stride_c, M, R1H,
                     group, BM: tl.constexpr, BK: tl.constexpr, J23: tl.constexpr, JC: tl.constexpr):
    """rows[g, k1] = sum_{n1 < R1/2} x[n1 M + n23] W_R1^{n1 k1} for k1 in [0, R1/2], g = b * channels + c.

    Operand columns j = c_local * J23 + n23_local (n23 fastest: the rows buffer's contiguous axis)."""
    ROW_BLOCKS = R1H // BM
    pid = tl.program_id(0)
    b = tl.program_id(1)
    row_block = pid % ROW_BLOCKS
    n23_0, c_0 = _tile_origin(pid // ROW_BLOCKS, M, channels, group, J23, JC)
    n23_in = n23_0 + tl.arange(0, J23)
    if JC == 1:  # one channel of a [C, T] signal: a 2-D tile, contiguous along n23
        x_row = x_ptr + b.to(tl.int64) * stride_b + c_0.to(tl.int64) * stride_c
        row_ok = n23_in * 0 + c_0 < channels  # (vector masks throughout: the interpreter rejects scalar ones)
    else:  # [B, T, C] signal: a [BK, J23, JC] tile, contiguous along channels
        c_in = c_0 + tl.arange(0, JC)
        x_cols = x_ptr + b.to(tl.int64) * stride_b + c_in.to(tl.int64)[None, None, :] * stride_c
    k1 = row_block * BM + tl.arange(0, BM)
    acc_re = tl.zeros([BM, JC * J23], dtype=tl.float32)
    acc_im = tl.zeros([BM, JC * J23], dtype=tl.float32)
    nyquist = tl.zeros([JC * J23], dtype=tl.float32)  # row k1 = R1/2: sum_n1 (-1)^n1 x[n1], real
    for start in range(0, R1H, BK):
        n1 = start + tl.arange(0, BK)
        if JC == 1:
            t = n1[:, None] * M + n23_in[None, :]
            x = tl.load(x_row + t.to(tl.int64) * stride_t, mask=(t < length) & row_ok[None, :], other=0.0)
        else:
            t = n1[:, None, None] * M + n23_in[None, :, None]
            x = tl.load(x_cols + t.to(tl.int64) * stride_t, mask=(t < length) & (c_in < channels)[None, None, :],
                        other=0.0)
            x = tl.reshape(tl.permute(x, (0, 2, 1)), (BK, JC * J23))
        x = x.to(tl.float32)
        table = k1[:, None] * R1H + n1[None, :]
        acc_re = tl.dot(tl.load(cos_ptr + table), x, acc_re)
        acc_im = tl.dot(tl.load(nsin_ptr + table), x, acc_im)
        nyquist += tl.sum(x * (1 - 2 * (n1 % 2)).to(tl.float32)[:, None], axis=0)
    j = tl.arange(0, JC * J23)
    n23 = n23_0 + j % J23
    c = c_0 + j // J23
    col_ok = c < channels
    row0 = rows_ptr + (b * channels + c).to(tl.int64) * ((R1H + 1) * 2 * M) + n23
    out = row0[None, :] + k1[:, None] * (2 * M)
    tl.store(out, acc_re, mask=col_ok[None, :])
    tl.store(out + M, acc_im, mask=col_ok[None, :])
    last = col_ok & (n23 * 0 + row_block == 0)
    tl.store(row0 + R1H * 2 * M, nyquist, mask=last)
    tl.store(row0 + R1H * 2 * M + M, tl.zeros_like(nyquist), mask=last)


@triton.jit
def _rows_idft_kernel(rows_ptr, y_ptr, mc_ptr, ms_ptr, length, channels, stride_b, stride_t, stride_c, N, M, R1H,
                      group, BM: tl.constexpr, BK: tl.constexpr, J23: tl.constexpr, JC: tl.constexpr):
    """y[n1 M + n23] = (1/N) sum_{k1 <= R1/2} c_k1 Re(rows[g, k1, n23] e^{2 pi i n1 k1 / R1}) for n1 < R1/2.

    Operand columns j = n23_local * JC + c_local (channel fastest: a time-major output's contiguous axis)."""
    ROW_BLOCKS = R1H // BM
    SEQ = (R1H + 1) * 2 * M
    pid = tl.program_id(0)
    b = tl.program_id(1)
    row_block = pid % ROW_BLOCKS
    n23_0, c_0 = _tile_origin(pid // ROW_BLOCKS, M, channels, group, J23, JC)
    n23_in = n23_0 + tl.arange(0, J23)
    if JC == 1:  # one channel: [BK, J23] tiles of its rows
        rows_in = rows_ptr + (b * channels + c_0).to(tl.int64) * SEQ + n23_in[None, :]
        in_ok = (n23_in * 0 + c_0 < channels)[None, :]
    else:  # [BK, JC, J23] tiles, contiguous along n23, swapped to channel-fastest columns
        c_in = c_0 + tl.arange(0, JC)
        rows_in = rows_ptr + (b * channels + c_in).to(tl.int64)[None, :, None] * SEQ + n23_in[None, None, :]
        in_ok = (c_in < channels)[None, :, None]
    n1 = row_block * BM + tl.arange(0, BM)
    acc = tl.zeros([BM, J23 * JC], dtype=tl.float32)
    for start in range(0, R1H, BK):
        k1 = start + tl.arange(0, BK)
        if JC == 1:
            src = rows_in + (k1 * (2 * M))[:, None]
            a_re = tl.load(src, mask=in_ok, other=0.0)
            a_im = tl.load(src + M, mask=in_ok, other=0.0)
        else:
            src = rows_in + (k1 * (2 * M))[:, None, None]
            a_re = tl.reshape(tl.permute(tl.load(src, mask=in_ok, other=0.0), (0, 2, 1)), (BK, J23 * JC))
            a_im = tl.reshape(tl.permute(tl.load(src + M, mask=in_ok, other=0.0), (0, 2, 1)), (BK, J23 * JC))
        table = n1[:, None] * R1H + k1[None, :]
        acc = tl.dot(tl.load(mc_ptr + table), a_re, acc)
        acc = tl.dot(tl.load(ms_ptr + table), a_im, acc)
    j = tl.arange(0, J23 * JC)
    n23 = n23_0 + j // JC
    c = c_0 + j % JC
    col_ok = c < channels
    nyquist = tl.load(rows_ptr + (b * channels + c).to(tl.int64) * SEQ + R1H * 2 * M + n23, mask=col_ok, other=0.0)
    acc += ((1 - 2 * (n1 % 2)).to(tl.float32) * (1.0 / N))[:, None] * nyquist[None, :]
    t = n1[:, None] * M + n23[None, :]
    dst = y_ptr + b.to(tl.int64) * stride_b + c.to(tl.int64)[None, :] * stride_c + t.to(tl.int64) * stride_t
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=(t < length) & col_ok[None, :])


# The spectral kernels load a row's DFT matrices and twiddles once, from small float32 tables computed in float64.
# The tile has 16 rows per warp (64 x 16 at 4 warps): the wgmma path keeps the loop-invariant F_R2 in shared memory
# (156-180 registers, no spills). With 32-row tiles at 4 warps Triton put the factors in mma.sync operand registers,
# ran every product twice (chained dots get all warps along the rows) and spilled at 255 registers.


@triton.jit
def _left_cdot(fr, fi, xr, xi, CONJ: tl.constexpr):
    """(fr + i fi) @ (xr + i xi), or conj(f) @ x, as four real products (the Gauss three-product form, measured in
    compiled SASS, spills at the wgmma tile shape)."""
    if CONJ:
        return tl.dot(fr, xr, tl.dot(fi, xi)), tl.dot(fr, xi) - tl.dot(fi, xr)
    return tl.dot(fr, xr) - tl.dot(fi, xi), tl.dot(fr, xi, tl.dot(fi, xr))


@triton.jit
def _right_cdot(xr, xi, fr, fi, CONJ: tl.constexpr):
    """x @ f, or x @ conj(f)."""
    if CONJ:
        return tl.dot(xr, fr, tl.dot(xi, fi)), tl.dot(xi, fr) - tl.dot(xr, fi)
    return tl.dot(xr, fr) - tl.dot(xi, fi), tl.dot(xr, fi, tl.dot(xi, fr))


@triton.jit
def _row_factors(row_twiddle, tables, R2: tl.constexpr, R3: tl.constexpr):
    """Row k1's twiddle W_N^{k1 n23}, F_R2, the inner twiddle W_M^{k2 n3} and F_R3, each as (re, im), from the
    tables: F_R2 [2, R2, R2], F_R3 [2, R3, R3], tw_inner [2, R2, R3] back to back."""
    M: tl.constexpr = R2 * R3
    i2 = tl.arange(0, R2)
    i3 = tl.arange(0, R3)
    tile = i2[:, None] * R3 + i3[None, :]
    f2 = tables + i2[:, None] * R2 + i2[None, :]
    f3 = tables + 2 * R2 * R2 + i3[:, None] * R3 + i3[None, :]
    inner = tables + 2 * R2 * R2 + 2 * R3 * R3 + tile
    return (tl.load(row_twiddle + tile), tl.load(row_twiddle + M + tile), tl.load(f2), tl.load(f2 + R2 * R2),
            tl.load(inner), tl.load(inner + M), tl.load(f3), tl.load(f3 + R3 * R3))


@triton.jit
def _folded_row_factors(folded_row, tables, R2: tl.constexpr, R3: tl.constexpr):
    """_row_factors with the row twiddle folded in (FFTPlan.folded_twiddles), from row k1 of _folded_tables. The
    row twiddle factors, W_N^{k1 (R3 n2 + n3)} = d2[n2] d3[n3] with d2 = W_N^{k1 R3 n2}, d3 = W_N^{k1 n3}, so its
    diagonal scalings join the program's loop-invariant factors: F_R2 (a * tw_row) = (F_R2 diag(d2)) a diag(d3),
    and diag(d3), a column scaling, commutes with the left product into tw_inner. The slots hold
    ((F_R2 diag(d2))^T = diag(d2) F_R2 -- the inverse's left factor, conjugated there --, F_R2 diag(d2),
    tw_inner * d3, F_R3), all plain loads: the loaded tiles and the left factors go to the tensor cores'
    shared-memory operands with no arithmetic in registers."""
    M: tl.constexpr = R2 * R3
    i2 = tl.arange(0, R2)
    i3 = tl.arange(0, R3)
    left = folded_row + i2[:, None] * R2 + i2[None, :]
    left_t = folded_row + i2[None, :] * R2 + i2[:, None]
    inner = folded_row + 2 * R2 * R2 + i2[:, None] * R3 + i3[None, :]
    f3 = tables + 2 * R2 * R2 + i3[:, None] * R3 + i3[None, :]
    return (tl.load(left_t), tl.load(left_t + R2 * R2), tl.load(left), tl.load(left + R2 * R2),
            tl.load(inner), tl.load(inner + M), tl.load(f3), tl.load(f3 + R3 * R3))


@triton.jit
def _row_spectrum(ar, ai, twr, twi, f2r, f2i, tir, tii, f3r, f3i, FOLDED: tl.constexpr):
    """X = ((F_R2 @ (a * tw_row)) * tw_inner) @ F_R3 for one row k1: the 2-D DFT over (n2, n3), output [k2, k3].
    FOLDED: the factors of _folded_row_factors, the row twiddle inside them."""
    if not FOLDED:
        ar, ai = ar * twr - ai * twi, ar * twi + ai * twr
    br, bi = _left_cdot(f2r, f2i, ar, ai, False)
    return _right_cdot(br * tir - bi * tii, br * tii + bi * tir, f3r, f3i, False)


@triton.jit
def _row_inverse(yr, yi, twr, twi, f2r, f2i, tir, tii, f3r, f3i, FOLDED: tl.constexpr):
    """The adjoint of _row_spectrum (every factor conjugated, in reverse order); the 1/N is in the rows stage.
    FOLDED: conj(tw_row) * (conj(F_R2) c) = conj(diag(d2) F_R2) (c * conj(d3)), the first slot's factor."""
    cr, ci = _right_cdot(yr, yi, f3r, f3i, True)
    cr, ci = cr * tir + ci * tii, ci * tir - cr * tii
    if FOLDED:
        xr, xi = _left_cdot(twr, twi, cr, ci, True)
    else:
        xr, xi = _left_cdot(f2r, f2i, cr, ci, True)
        xr, xi = xr * twr + xi * twi, xi * twr - xr * twi
    return xr, xi


@triton.jit
def _store_complex(ptr, tile, re, im, M: tl.constexpr, JOINED: tl.constexpr):
    """ptr[tile] <- re, ptr[M + tile] <- im (the row buffer's two planes).

    A store from the accumulator (wgmma) layout is converted to the coalesced layout of its pointers through shared
    memory: a barrier before the scratch is written and one after. JOINED stores the [R2, R3, 2] pair with one
    conversion (8 KB of scratch, 2 barriers) instead of two (FFTPlan.joined_stores)."""
    if JOINED:
        tl.store(ptr + tile[:, :, None] + (tl.arange(0, 2) * M)[None, None, :], tl.join(re, im))
    else:
        tl.store(ptr + tile, re)
        tl.store(ptr + M + tile, im)


# The spectral kernels walk one flat loop over their (channel, batch) items, b fastest. K's spectrum is recomputed
# for every item: free at B = 1, the usual case. (Software-pipelining this loop, stages = 2, measured 6% slower on an
# H100. Fewer, wider products -- each complex product on the interleaved real form [x] = [R2, 2 R3], x F_R3 as one
# product with F_R3's real [2 R3, 2 R3] form, F_R2 x as one chain of two: 5 or 3 wgmma waits per 2-D transform
# instead of 8 -- measured 12-18% and 45-50% slower: the interleaving's layout conversions through shared memory
# (25 and 46 barriers per product item instead of 17) cost more than the waits saved.)


@triton.jit
def _spectral_product_kernel(u_rows, k_rows, y_rows, tables, row_twiddles, folded, batch, channels,
                             items_per_program, SEQ, R2: tl.constexpr, R3: tl.constexpr, JOINED: tl.constexpr,
                             FOLDED: tl.constexpr):
    """Row k1 of every (b, c): y_rows <- IDFT2(DFT2(u_rows) * DFT2(k_rows[c])) (y_rows may be u_rows)."""
    M: tl.constexpr = R2 * R3
    k1 = tl.program_id(0)
    first = tl.program_id(1) * items_per_program
    last = tl.minimum(first + items_per_program, batch * channels)
    if FOLDED:
        factors = _folded_row_factors(folded + k1 * (2 * R2 * R2 + 2 * M), tables, R2, R3)
    else:
        factors = _row_factors(row_twiddles + k1 * (2 * M), tables, R2, R3)
    tile = tl.arange(0, R2)[:, None] * R3 + tl.arange(0, R3)[None, :]
    row = tl.zeros([], dtype=tl.int64) + k1 * (2 * M)
    for item in range(first, last):
        c = item // batch
        # int64 before the product: c SEQ passes 2^31 from 8192 channels at T = 131072
        k_row = k_rows + (row + c.to(tl.int64) * SEQ)
        offset = row + ((item % batch) * channels + c).to(tl.int64) * SEQ
        if FOLDED:  # both loaded before either product: their four operand tiles share one shared-memory round trip
            k_in = tl.load(k_row + tile), tl.load(k_row + M + tile)
            u_in = tl.load(u_rows + offset + tile), tl.load(u_rows + offset + M + tile)
            kr, ki = _row_spectrum(*k_in, *factors, FOLDED)
            ur, ui = _row_spectrum(*u_in, *factors, FOLDED)
        else:
            kr, ki = _row_spectrum(tl.load(k_row + tile), tl.load(k_row + M + tile), *factors, FOLDED)
            ur, ui = _row_spectrum(tl.load(u_rows + offset + tile), tl.load(u_rows + offset + M + tile), *factors,
                                   FOLDED)
        yr, yi = _row_inverse(ur * kr - ui * ki, ur * ki + ui * kr, *factors, FOLDED)
        _store_complex(y_rows + offset, tile, yr, yi, M, JOINED)


@triton.jit
def _spectral_grad_kernel(dy_rows, u_rows, k_rows, dk_rows, tables, row_twiddles, folded, batch, channels,
                          items_per_program, SEQ, R2: tl.constexpr, R3: tl.constexpr, NEED_DU: tl.constexpr,
                          NEED_DK: tl.constexpr, JOINED: tl.constexpr, FOLDED: tl.constexpr):
    """Row k1: dy_rows <- IDFT2(DY conj(K)) (du, in place), dk_rows <- IDFT2(sum_b DY_b conj(U_b)) (dk; dk_rows
    may be k_rows).

    A program's items cover whole channels (items_per_program is a multiple of batch)."""
    M: tl.constexpr = R2 * R3
    k1 = tl.program_id(0)
    first = tl.program_id(1) * items_per_program
    last = tl.minimum(first + items_per_program, batch * channels)
    if FOLDED:
        factors = _folded_row_factors(folded + k1 * (2 * R2 * R2 + 2 * M), tables, R2, R3)
    else:
        factors = _row_factors(row_twiddles + k1 * (2 * M), tables, R2, R3)
    tile = tl.arange(0, R2)[:, None] * R3 + tl.arange(0, R3)[None, :]
    row = tl.zeros([], dtype=tl.int64) + k1 * (2 * M)
    dkr = tl.zeros([R2, R3], dtype=tl.float32)
    dki = tl.zeros([R2, R3], dtype=tl.float32)
    for item in range(first, last):
        c = item // batch
        b = item % batch
        k_row = k_rows + (row + c.to(tl.int64) * SEQ)
        dk_row = dk_rows + (row + c.to(tl.int64) * SEQ)
        dy_row = dy_rows + (row + (b * channels + c).to(tl.int64) * SEQ)
        dy_in = tl.load(dy_row + tile), tl.load(dy_row + M + tile)
        # FOLDED: dy's and k's tiles loaded before the first product share one shared-memory round trip (u's too
        # spill at 255 registers in the sm_90 compile: u's stays at its use)
        if FOLDED:
            if NEED_DU:
                k_in = tl.load(k_row + tile), tl.load(k_row + M + tile)
        gr, gi = _row_spectrum(*dy_in, *factors, FOLDED)
        if NEED_DU:  # DY conj(K)
            if not FOLDED:
                k_in = tl.load(k_row + tile), tl.load(k_row + M + tile)
            kr, ki = _row_spectrum(*k_in, *factors, FOLDED)
            dur, dui = _row_inverse(gr * kr + gi * ki, gi * kr - gr * ki, *factors, FOLDED)
            _store_complex(dy_row, tile, dur, dui, M, JOINED)
        if NEED_DK:  # sum_b DY conj(U), written once the channel's last batch row is in
            u_row = u_rows + (row + (b * channels + c).to(tl.int64) * SEQ)
            ur, ui = _row_spectrum(tl.load(u_row + tile), tl.load(u_row + M + tile), *factors, FOLDED)
            dkr += gr * ur + gi * ui
            dki += gi * ur - gr * ui
            if b == batch - 1:
                outr, outi = _row_inverse(dkr, dki, *factors, FOLDED)
                _store_complex(dk_row, tile, outr, outi, M, JOINED)
                dkr = tl.zeros([R2, R3], dtype=tl.float32)
                dki = tl.zeros([R2, R3], dtype=tl.float32)


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


def _rows_launch(signal: _Signal, plan: FFTPlan, idft_channels: int | None = None):
    """Grid and tile constants of the rows kernels.

    On GPUs a tile is 64 columns: 8 consecutive n23 (one 32-byte sector of a rows-buffer row) times 8 channels (one
    sector of a time-major [T, C] row), or 64 consecutive n23 of one channel for channel-major signals. (128-column
    tiles need ~170-210 registers per thread at 8 warps, one program per SM; 64 columns, 92-126: two.)
    idft_channels (rows_idft into a time-major signal, FFTPlan.idft_channels): 128 columns, 128 / idft_channels
    n23 times idft_channels channels, at 4 warps (one warpgroup: a warp store is one n1 row of the tile) with k1 in
    steps of 16 (sm_90: 126-127 registers, no spills, 8 barriers; 8 n23 x 32 channels, or 8 warps, spill or take
    33-67 barriers).
    """
    wide = bool(idft_channels) and signal.time_major
    columns = (128 if wide else 64) if signal.data.is_cuda else min(_INTERPRETER_TILE_COLUMNS, plan.m * 8)
    bm = min(plan.half_rows, 64)
    if wide:
        j23, jc, bk, warps = columns // idft_channels, idft_channels, 16, 4
    else:
        j23, jc = (columns // 8, 8) if signal.time_major else (min(columns, plan.m), 1)
        bk, warps = bm, 8
    tiles = (plan.m // j23) * triton.cdiv(signal.channels, jc)
    grid = (tiles * (plan.half_rows // bm), signal.batch)
    meta = dict(group=min(plan.rows_group, plan.m // j23), BM=bm, BK=bk, J23=j23, JC=jc, num_warps=warps,
                num_stages=1)
    if plan.rows_maxnreg:
        meta["maxnreg"] = plan.rows_maxnreg
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
    grid, meta = _rows_launch(out, plan, plan.idft_channels)
    _rows_idft_kernel[grid](rows, out.data, mc, ms, out.length, out.channels, out.stride_b, out.stride_t,
                            out.stride_c, plan.n, plan.m, plan.half_rows, **meta)


def _spectral_grid(plan: FFTPlan, batch: int, channels: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """Items (channel, batch row) per program, whole channels: enough programs to fill the GPU, few large ones
    under the interpreter."""
    rows = plan.half_rows + 1
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        per_program = max(1, min(16, channels * rows // target))
    else:
        per_program = channels
    items = per_program * batch
    return (rows, triton.cdiv(batch * channels, items)), items


def _spectral_options(plan: FFTPlan) -> dict:
    return dict(R2=plan.r2, R3=plan.r3, JOINED=plan.joined_stores, FOLDED=plan.folded_twiddles,
                num_warps=plan.spectral_warps, num_stages=1)


def _folded(plan: FFTPlan, row_twiddles: torch.Tensor) -> torch.Tensor:
    """The folded factors' table when plan.folded_twiddles; else the kernels do not read that argument (it gets
    row_twiddles, a valid device pointer)."""
    if not plan.folded_twiddles:
        return row_twiddles
    return _folded_tables(plan.n, plan.r1, plan.r2, plan.r3, row_twiddles.device)


def spectral_product(u_rows: torch.Tensor, k_rows: torch.Tensor, batch: int, channels: int, plan: FFTPlan,
                     y_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of y = u * k; written over u_rows unless y_rows is given."""
    y_rows = u_rows if y_rows is None else y_rows
    grid, items = _spectral_grid(plan, batch, channels, u_rows.device)
    tables, row_twiddles = _spectral_tables(plan.n, plan.r1, plan.r2, plan.r3, u_rows.device)
    _spectral_product_kernel[grid](u_rows, k_rows, y_rows, tables, row_twiddles, _folded(plan, row_twiddles), batch,
                                   channels, items, u_rows[0].numel(), **_spectral_options(plan))
    return y_rows


def spectral_grad(dy_rows, u_rows, k_rows, dk_rows, batch: int, channels: int, plan: FFTPlan, need_du: bool,
                  need_dk: bool):
    """Rows of du over dy_rows (if need_du) and of dk into dk_rows (if need_dk; may be k_rows)."""
    grid, items = _spectral_grid(plan, batch, channels, dy_rows.device)
    tables, row_twiddles = _spectral_tables(plan.n, plan.r1, plan.r2, plan.r3, dy_rows.device)
    _spectral_grad_kernel[grid](dy_rows, u_rows if need_dk else dy_rows, k_rows, dk_rows, tables, row_twiddles,
                                _folded(plan, row_twiddles), batch, channels, items, dy_rows[0].numel(),
                                NEED_DU=need_du, NEED_DK=need_dk, **_spectral_options(plan))


class CausalFFTConvFunction(torch.autograd.Function):
    """u [B, T, C], k [C, Tk] -> y [B, T, C] in ``out_dtype`` (u's dtype when None).

    With plan.keep_rows the forward keeps the row buffers of u and k for the backward (4X more memory kept from
    forward to backward; the backward skips two rows stages, 6X of traffic); otherwise the backward recomputes them.
    (Keeping the 2-D spectra instead, so that the backward's spectral kernel skips two of its five transforms,
    measured a wash on an H100: grad -0.65 ms, forward +0.7 ms; benchmarks/NOTES.md.)"""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, plan: FFTPlan, out_dtype: torch.dtype | None = None):
        u, k = u.contiguous(), k.contiguous()
        batch, length, channels = u.shape
        u_rows = rows_dft(_Signal.time_major_of(u), plan)
        k_rows = rows_dft(_Signal.channel_major_of(k), plan)
        y_rows = spectral_product(u_rows, k_rows, batch, channels, plan,
                                  torch.empty_like(u_rows) if plan.keep_rows else None)
        y = new_output(u.shape, out_dtype or u.dtype, u.device)
        rows_idft(y_rows, _Signal.time_major_of(y), plan)
        if plan.keep_rows:
            ctx.save_for_backward(u, k, u_rows, k_rows)
        else:
            ctx.save_for_backward(u, k)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        u, k, *kept = ctx.saved_tensors
        plan = ctx.plan
        need_du, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        batch, length, channels = u.shape
        dy_rows = rows_dft(_Signal.time_major_of(dy.contiguous()), plan)
        if kept:
            u_rows, k_rows = kept
            dk_rows = torch.empty_like(k_rows) if need_dk else k_rows
        else:
            u_rows = rows_dft(_Signal.time_major_of(u), plan) if need_dk else None
            # K's spectrum is needed for du only; without it the buffer just receives dk
            k_rows = rows_dft(_Signal.channel_major_of(k), plan) if need_du else torch.empty_like(dy_rows[:channels])
            dk_rows = k_rows
        spectral_grad(dy_rows, u_rows, k_rows, dk_rows, batch, channels, plan, need_du, need_dk)
        du = dk = None
        if need_du:
            du = new_output(u.shape, u.dtype, u.device)
            rows_idft(dy_rows, _Signal.time_major_of(du), plan)
        if need_dk:
            dk = new_output(k.shape, k.dtype, k.device)
            rows_idft(dk_rows, _Signal.channel_major_of(dk), plan)
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


# The default plan keeps the forward's row buffers (plan.keep_rows) when a backward will follow and the kept bytes are
# at most this fraction of the device memory free at the call (the driver's free memory plus what PyTorch's allocator
# holds unused). The rest stays for the backward's own buffers (dy's rows and dk's: about as large as the kept ones)
# and for everything else; layers that run later in a forward see less free memory, so once memory gets short they
# recompute instead of keeping, and nothing runs out of memory only because of keeping.
KEEP_ROWS_FREE_FRACTION = 0.25


def _kept_bytes(batch: int, channels: int, plan: FFTPlan) -> int:
    return 4 * (plan.half_rows + 1) * 2 * plan.m * (batch + 1) * channels


def default_plan(u: torch.Tensor, k: torch.Tensor) -> FFTPlan:
    """fft_plan for u's length, keep_rows on under KEEP_ROWS_FREE_FRACTION's rule (off without a backward). Under
    the interpreter (no device memory to budget) keep_rows follows the backward alone."""
    plan = fft_plan(u.shape[1])
    if not (torch.is_grad_enabled() and (u.requires_grad or k.requires_grad)):
        return plan
    if u.is_cuda:
        free, _ = torch.cuda.mem_get_info(u.device)
        free += torch.cuda.memory_reserved(u.device) - torch.cuda.memory_allocated(u.device)
        if _kept_bytes(u.shape[0], u.shape[2], plan) > KEEP_ROWS_FREE_FRACTION * free:
            return plan
    return dataclasses.replace(plan, keep_rows=True)


def causal_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_{j <= t} k[c, t - j] u[b, j, c]: a causal convolution per channel, by FFT.

    u: [B, T, C] (float32, bfloat16 or float16); k: [C, Tk] with 1 <= Tk <= T, taps Tk.. T-1 read as zero.
    Returns y [B, T, C] in u's dtype; differentiable in u and k (dk in k's dtype). Any T >= 1 up to 524288.

    Where ``use_triton(u)``: the Triton kernels at FFT size N = max(2^13, next power of two >= 2T) (the padding is
    free of charge in memory, it only costs compute: T = 2^j + 1 does twice the work of T = 2^j), float32
    intermediates and tf32 tensor-core products (relative error ~5e-3 at T = 65536 on an H100; float64 inputs are
    computed in float32 there); the forward keeps the row buffers of u and k (2 (B + 1) T C float32 values) for the
    backward when they fit the memory budget of ``default_plan`` (KEEP_ROWS_FREE_FRACTION).
    Elsewhere: ``causal_fft_conv_torch`` (float32/float64 cuFFT or pocketfft).
    """
    _check(u, k)
    if use_triton(u):
        return CausalFFTConvFunction.apply(u, k, default_plan(u, k), None)
    return causal_fft_conv_torch(u, k)
