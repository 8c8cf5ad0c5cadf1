"""RMSNorm (optionally SiLU-gated) and the L2 norm as one Triton kernel pair over the last dimension.

Both are  y = x r [* weight] [* silu(gate)],  r = (sum_d x_d^2 / n + eps)^(-1/2),  with n = D for RMSNorm and
n = 1 for the L2 norm (reference.py). A forward program reads x (and the gate) once and writes y; a backward
program reads x, the gate and dy once and writes dx, dgate and its share of dweight. r is recomputed in the
backward (one row sum) rather than stored. Statistics in float32; every tensor keeps its own dtype. With
x^ = x r and u = dy silu(gate) weight (the cotangent of x^):

    dx     = r (u - x^ sum_d(u x^) / n)             (the derivative of x r, r depending on every x_d)
    dgate  = dy x^ weight silu'(gate),   silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
    dweight = sum over rows of dy silu(gate) x^      (per-program partials, summed in torch: deterministic)

Each program walks a contiguous run of row blocks, so a long [T * H, D] input is at most
TUNING["max_programs"] programs. Rows are addressed as x viewed [M, H, D] with two strides (row i at
(i // H) * outer + (i % H) * inner): a gate cut from a wider projection output needs no copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import new_output, use_triton
from .reference import l2_norm_reference, rms_norm_reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 16384  # one row per block in registers
# block_elements: rows x padded D per block; max_programs: the grid's cap (each program loops over its blocks).
TUNING = {"block_elements": 4096, "max_programs": 2048}


@triton.jit
def _norm_fwd_kernel(x, gate, weight, y, n_rows, heads, x_outer, x_inner, g_outer, g_inner, D, inv_n, eps,
                     blocks_per_program, BT: tl.constexpr, BD: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_GATE: tl.constexpr):
    cols = tl.arange(0, BD)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(weight + cols, mask=col_mask, other=0.0).to(tl.float32)
    first_block = tl.program_id(0).to(tl.int64) * blocks_per_program
    for i in range(blocks_per_program):
        rows = (first_block + i) * BT + tl.arange(0, BT)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        m, h = rows // heads, rows % heads
        b_x = tl.load(x + (m * x_outer + h * x_inner)[:, None] + cols[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) * inv_n + eps)
        b_y = b_x * r[:, None]
        if HAS_WEIGHT:
            b_y = b_y * w[None, :]
        if HAS_GATE:
            b_g = tl.load(gate + (m * g_outer + h * g_inner)[:, None] + cols[None, :],
                          mask=mask, other=0.0).to(tl.float32)
            b_y = b_y * b_g / (1.0 + tl.exp(-b_g))  # silu(g) = g sigmoid(g)
        tl.store(y + rows[:, None] * D + cols[None, :], b_y.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(x, gate, weight, dy, dx, dgate, dweight_partial, n_rows, heads, x_outer, x_inner,
                     g_outer, g_inner, dy_outer, dy_inner, D, inv_n, eps, blocks_per_program,
                     BT: tl.constexpr, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GATE: tl.constexpr):
    cols = tl.arange(0, BD)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(weight + cols, mask=col_mask, other=0.0).to(tl.float32)
        b_dw = tl.zeros([BT, BD], dtype=tl.float32)  # summed over rows once, after the loop
    first_block = tl.program_id(0).to(tl.int64) * blocks_per_program
    for i in range(blocks_per_program):
        rows = (first_block + i) * BT + tl.arange(0, BT)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        m, h = rows // heads, rows % heads
        b_x = tl.load(x + (m * x_outer + h * x_inner)[:, None] + cols[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) * inv_n + eps)
        x_hat = b_x * r[:, None]
        b_du = tl.load(dy + (m * dy_outer + h * dy_inner)[:, None] + cols[None, :],
                       mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            b_g = tl.load(gate + (m * g_outer + h * g_inner)[:, None] + cols[None, :],
                          mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-b_g))
            normed = x_hat
            if HAS_WEIGHT:
                normed = normed * w[None, :]
            b_dg = b_du * normed * sig * (1.0 + b_g * (1.0 - sig))
            tl.store(dgate + rows[:, None] * D + cols[None, :], b_dg.to(dgate.dtype.element_ty), mask=mask)
            b_du = b_du * b_g * sig
        if HAS_WEIGHT:
            b_dw += b_du * x_hat
            b_du = b_du * w[None, :]
        b_dx = r[:, None] * (b_du - x_hat * (tl.sum(b_du * x_hat, axis=1) * inv_n)[:, None])
        tl.store(dx + rows[:, None] * D + cols[None, :], b_dx.to(dx.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dweight_partial + tl.program_id(0) * D + cols, tl.sum(b_dw, axis=0), mask=col_mask)


def _as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """t [..., H, D] as a [M, H, D] view with unit column stride (a copy only where the leading dims do not
    flatten): (view, outer stride, inner stride)."""
    heads = t.shape[-2] if t.dim() > 1 else 1
    view = t.reshape(-1, heads, t.shape[-1])
    if view.stride(2) != 1:
        view = view.contiguous()
    return view, view.stride(0), view.stride(1)


def _launch_shape(n_rows: int, D: int) -> tuple[int, int, int, int, int]:
    """(BT rows per block, BD padded D, blocks per program, programs, warps)."""
    BD = triton.next_power_of_2(D)
    BT = max(1, min(TUNING["block_elements"] // BD, triton.next_power_of_2(max(n_rows, 1))))
    blocks = triton.cdiv(max(n_rows, 1), BT)
    per_program = triton.cdiv(blocks, TUNING["max_programs"])
    warps = max(1, min(16, BT * BD // 512))
    return BT, BD, per_program, triton.cdiv(blocks, per_program), warps


class NormFunction(torch.autograd.Function):
    """y = x r [* weight] [* silu(gate)] with r = (sum(x^2) * inv_n + eps)^(-1/2) over the last dim."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps, inv_n):
        D = x.shape[-1]
        xr, x_outer, x_inner = _as_rows(x)
        gr, g_outer, g_inner = _as_rows(gate) if gate is not None else (xr, 0, 0)
        n_rows = xr.shape[0] * xr.shape[1]
        y = new_output(x.shape, x.dtype, x.device)
        BT, BD, per_program, programs, warps = _launch_shape(n_rows, D)
        _norm_fwd_kernel[(programs,)](
            xr, gr, weight if weight is not None else xr, y, n_rows, xr.shape[1], x_outer, x_inner, g_outer, g_inner,
            D, inv_n, eps, per_program, BT=BT, BD=BD, HAS_WEIGHT=weight is not None, HAS_GATE=gate is not None,
            num_warps=warps)
        ctx.save_for_backward(x, weight, gate)
        ctx.eps, ctx.inv_n = eps, inv_n
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate = ctx.saved_tensors
        D = x.shape[-1]
        xr, x_outer, x_inner = _as_rows(x)
        gr, g_outer, g_inner = _as_rows(gate) if gate is not None else (xr, 0, 0)
        dyr, dy_outer, dy_inner = _as_rows(dy)
        n_rows = xr.shape[0] * xr.shape[1]
        BT, BD, per_program, programs, warps = _launch_shape(n_rows, D)
        dx = new_output(x.shape, x.dtype, x.device)
        dgate = new_output(gate.shape, gate.dtype, gate.device) if gate is not None else None
        partial = new_output((programs, D), torch.float32, x.device) if weight is not None else None
        _norm_bwd_kernel[(programs,)](
            xr, gr, weight if weight is not None else xr, dyr, dx, dgate if gate is not None else dx,
            partial if weight is not None else dx, n_rows, xr.shape[1], x_outer, x_inner, g_outer, g_inner,
            dy_outer, dy_inner, D, ctx.inv_n, ctx.eps, per_program, BT=BT, BD=BD,
            HAS_WEIGHT=weight is not None, HAS_GATE=gate is not None, num_warps=warps)
        dweight = partial.sum(0).to(weight.dtype) if weight is not None else None
        return dx, dweight, dgate, None, None


def check_inputs(x: torch.Tensor, weight: torch.Tensor | None, gate: torch.Tensor | None, eps: float) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16; got {x.dtype}")
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_DIM:
        raise ValueError(f"x must be [..., D] with 1 <= D <= {MAX_DIM}; got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight is not None and (weight.shape != (D,) or weight.dtype not in FLOAT_DTYPES or weight.device != x.device):
        raise ValueError(f"weight must be [D={D}], float32/bfloat16/float16, on {x.device}; "
                         f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if gate is not None and (gate.shape != x.shape or gate.dtype not in FLOAT_DTYPES or gate.device != x.device):
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, float32/bfloat16/float16, on {x.device}; "
                         f"got {tuple(gate.shape)} {gate.dtype} on {gate.device}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
             gate: torch.Tensor | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight [* silu(gate)] over the last dim (norm before gate: Qwen3-Next's
    RMSNormGated). x, gate [..., D]; weight [D] or None -> y [..., D] in x's dtype. Triton where ``use_triton(x)``,
    the torch formula (reference.py) otherwise."""
    check_inputs(x, weight, gate, eps)
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps, gate)
    return NormFunction.apply(x, weight, gate, float(eps), 1.0 / x.shape[-1])


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(sum(x^2) + eps) over the last dim. x [..., D] -> y [..., D] in x's dtype."""
    check_inputs(x, None, None, eps)
    if not use_triton(x):
        return l2_norm_reference(x, eps)
    return NormFunction.apply(x, None, None, float(eps), 1.0)
