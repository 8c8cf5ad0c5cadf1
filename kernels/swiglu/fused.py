"""SwiGLU's activation over the fused gate/up projection output as one Triton kernel pair.

With gate_up = [g; u] along the last dimension (2F wide: the first half the gate, the second the up projection, as
the fused projection and each tensor-parallel rank's [gate_r; up_r] shard lay them out), s = sigmoid(g):

    h  = silu(g) u = g s u                                             (reference.py)
    dg = dh u silu'(g),   silu'(g) = s (1 + g (1 - s))
    du = dh silu(g)

The op moves memory and does a few flops per element, so the point is the fewest passes: the forward reads g and u
in place (rows may be strided, as a view of a wider tensor: no copy) and writes h; the backward reads g, u and dh
once and writes dg and du straight into one [..., 2F] gradient, the layout of gate_up itself (no zero-filled buffer
or concatenation from autograd's chunk backward). silu(g) is recomputed in the backward, so nothing but the input is
saved. Math in float32; h and the gradient take gate_up's dtype.

Each program handles one block of BT rows x BF columns of h (and of both halves of gate_up). On a GPU BF is the
largest power of two dividing F up to TUNING's cap, so no lane is masked (F = 5632 = 11 x 512); BT fills the block.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..common import new_output, use_triton
from .reference import swiglu_reference

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 takes the torch path (the oracle's precision)
MIN_FITTED_COLUMNS = 64  # below this a column block dividing F would split rows too finely: pad instead


@dataclasses.dataclass(frozen=True)
class Blocks:
    elements: int  # BT x BF per program (BT shrinks to the row count)
    max_columns: int  # cap on BF, a power of two
    warps: int
    fit_columns: bool  # prefer a BF that divides F (no masked lanes) over one that spans F


# CUDA blocks, not yet timed on a GPU: 4096 elements over 4 warps is 32 per thread and tensor (four 16-byte bf16
# vectors); at [65536, 5632] that is 8 x 512 blocks, 90,112 programs. sm_90 offline compile (triton 3.9, bf16, F and
# row strides divisible by 16 as at 5632): forward 44 registers, backward 80, no spills, every load and store 16-byte
# vectorised. benchmarks/kernel_ops/swiglu.py sweeps other blocks.
TUNING = Blocks(elements=4096, max_columns=1024, warps=4, fit_columns=True)
# Under the interpreter each program costs milliseconds: few, large blocks (a tiny model's activation is one).
INTERPRETER_TUNING = Blocks(elements=1 << 16, max_columns=1 << 12, warps=1, fit_columns=False)


def block_shape(n_rows: int, F: int, device: torch.device) -> tuple[int, int, int]:
    """(BT rows, BF columns, warps) of one program's block for an [n_rows, F] activation."""
    blocks = TUNING if device.type == "cuda" else INTERPRETER_TUNING
    largest_divisor = F & -F  # the largest power of two dividing F
    if blocks.fit_columns and largest_divisor >= MIN_FITTED_COLUMNS:
        BF = min(largest_divisor, blocks.max_columns)
    else:
        BF = min(blocks.max_columns, triton.next_power_of_2(F))
    BT = max(1, min(blocks.elements // BF, triton.next_power_of_2(max(n_rows, 1))))
    return BT, BF, blocks.warps


# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _block_halves(gate_up, n_rows, F, gu_row_stride, BT: tl.constexpr, BF: tl.constexpr):
    """This program's block: (rows, cols, mask, g, u), g and u float32 [BT, BF]."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    gate = gate_up + rows[:, None] * gu_row_stride + cols[None, :]
    b_g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, b_g, b_u


@triton.jit
def _swiglu_fwd_kernel(gate_up, h, n_rows, F, gu_row_stride, BT: tl.constexpr, BF: tl.constexpr):
    rows, cols, mask, b_g, b_u = _block_halves(gate_up, n_rows, F, gu_row_stride, BT, BF)
    b_h = b_g * tl.sigmoid(b_g) * b_u
    tl.store(h + rows[:, None] * F + cols[None, :], b_h.to(h.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate_up, dh, d_gate_up, n_rows, F, gu_row_stride, dh_row_stride,
                       BT: tl.constexpr, BF: tl.constexpr):
    rows, cols, mask, b_g, b_u = _block_halves(gate_up, n_rows, F, gu_row_stride, BT, BF)
    b_dh = tl.load(dh + rows[:, None] * dh_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(b_g)
    b_dg = b_dh * b_u * s * (1.0 + b_g * (1.0 - s))
    b_du = b_dh * b_g * s
    d_gate = d_gate_up + rows[:, None] * (2 * F) + cols[None, :]
    tl.store(d_gate, b_dg.to(d_gate_up.dtype.element_ty), mask=mask)
    tl.store(d_gate + F, b_du.to(d_gate_up.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [M, C] with unit column stride; rows keep their stride (a copy only where the leading dims do
    not flatten or columns are strided)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(g) u with [g; u] = gate_up along the last dim."""

    @staticmethod
    def forward(ctx, gate_up):
        F = gate_up.shape[-1] // 2
        rows = _as_rows(gate_up)
        h = new_output((*gate_up.shape[:-1], F), gate_up.dtype, gate_up.device)
        if rows.shape[0] > 0:
            BT, BF, warps = block_shape(rows.shape[0], F, gate_up.device)
            _swiglu_fwd_kernel[(triton.cdiv(rows.shape[0], BT), triton.cdiv(F, BF))](
                rows, h, rows.shape[0], F, rows.stride(0), BT=BT, BF=BF, num_warps=warps)
        ctx.save_for_backward(gate_up)
        return h

    @staticmethod
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        F = gate_up.shape[-1] // 2
        rows, dh_rows = _as_rows(gate_up), _as_rows(dh)
        d_gate_up = new_output(gate_up.shape, gate_up.dtype, gate_up.device)
        if rows.shape[0] > 0:
            BT, BF, warps = block_shape(rows.shape[0], F, gate_up.device)
            _swiglu_bwd_kernel[(triton.cdiv(rows.shape[0], BT), triton.cdiv(F, BF))](
                rows, dh_rows, d_gate_up, rows.shape[0], F, rows.stride(0), dh_rows.stride(0),
                BT=BT, BF=BF, num_warps=warps)
        return d_gate_up


def check_input(gate_up: torch.Tensor) -> None:
    if gate_up.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise ValueError(f"gate_up must be float32, bfloat16, float16 or float64; got {gate_up.dtype}")
    if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2F] with an even, nonzero last dim; got shape {tuple(gate_up.shape)}")


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u with g = gate_up[..., :F], u = gate_up[..., F:]. gate_up [..., 2F] (rows may be strided) ->
    h [..., F] in gate_up's dtype. The fused Triton kernels where ``use_triton(gate_up)`` and the dtype is float32,
    bfloat16 or float16; the torch formula (reference.py, float32 math) elsewhere, float64 included."""
    check_input(gate_up)
    if use_triton(gate_up) and gate_up.dtype in KERNEL_DTYPES:
        return SwiGLUFunction.apply(gate_up)
    return swiglu_reference(gate_up)
