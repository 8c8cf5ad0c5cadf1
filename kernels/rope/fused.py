"""Rotary position embedding (RoPE) as one Triton kernel per direction.

x [..., L, H, D], positions [..., L]; on the first rot_dim channels, pairs (x1, x2) = (x[j], x[j + rot_dim/2]) for
j < rot_dim/2 are rotated by angle = position * theta^(-2j / rot_dim) (reference.py, rotate-half convention):

    forward    y1 = x1 cos - x2 sin,      y2 = x2 cos + x1 sin
    backward  dx1 = dy1 cos + dy2 sin,   dx2 = dy2 cos - dy1 sin   (the rotation is orthogonal: R(angle)^T = R(-angle))

and channels rot_dim .. D pass through (y = x, dx = dy). Both directions are the same kernel with the sine's sign
flipped; positions get no gradient and are all the backward keeps (x is not saved).

The torch formula runs ~10 float32 elementwise passes and concatenations over the tensor; the kernel reads x once
and writes y once. cos and sin come from the positions inside the kernel (no [L, rot_dim] table) in float32: the
[rot_dim/2] inverse frequencies are the torch path's own (reference.py's ``inverse_frequencies``, computed once per
(rot_dim, theta, device)), the angle is the same float32 product and tl.cos / tl.sin lower to libdevice's cosf /
sinf (CUDA's, as torch's, with full range reduction: angles reach ~10^5 radians at 64k+ positions), so
checkpoints and the HF export see the same rotation up to float32 rounding of the last products.

Each program takes BT tokens: it computes the [BT, rot_dim/2] cos and sin once and loops over the H heads, so the
transcendentals cost nothing per head. x may be a strided view (rows and heads of any stride, channels contiguous:
q and k as views of the fused projections' output are read in place); y and dx are fresh contiguous tensors.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ..common import new_output, use_triton
from .reference import inverse_frequencies, rope_reference

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 takes the torch path (the oracle's precision)


@dataclasses.dataclass(frozen=True)
class Blocks:
    elements: int  # BT tokens x next_power_of_2(D) channels of one head per loop step (BT shrinks to the token count)
    warps: int


# CUDA blocks (on an H100 at [65536, 16, 128], bf16: fwd 0.323 ms, fwd+bwd 0.579 ms, 57-63% of the copy rate; the
# variants in benchmarks/kernel_ops/rope.py not yet swept): 32 tokens per program (2048 programs, each moving 16
# heads x 8 KB), 8 rotated pairs per thread and head step (one 16-byte load of x1 and one of x2) over 8 warps.
# sm_90 offline compile (triton 3.9, bf16, strides divisible by 16, rot_dim = D = 128), both directions: 64
# registers (4 CTAs, 32 warps per SM), one 4-byte spill outside the head loop, every load and store of x and y
# 16-byte vectorised; at 4 warps (16 pairs per thread) 116 registers (16 warps per SM), at 64 tokens / 4 warps
# 156 with real spills. benchmarks/kernel_ops/rope.py sweeps other blocks.
TUNING = Blocks(elements=4096, warps=8)
# Under the interpreter each program costs milliseconds: few, large blocks (a test's tensor is one).
INTERPRETER_TUNING = Blocks(elements=1 << 16, warps=1)


def block_tokens(n_tokens: int, D: int, device: torch.device) -> tuple[int, int]:
    """(BT tokens per program, warps) for n_tokens tokens of head dim D."""
    blocks = TUNING if device.type == "cuda" else INTERPRETER_TUNING
    BT = max(1, min(blocks.elements // triton.next_power_of_2(D), triton.next_power_of_2(max(n_tokens, 1))))
    return BT, blocks.warps


@triton.jit
def _rope_kernel(x, positions, inv_freq, y, n_tokens, x_token_stride, x_head_stride,
                 H: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, SIGN: tl.constexpr,
                 BT: tl.constexpr, BHALF: tl.constexpr, BPASS: tl.constexpr):
    """y = x rotated by SIGN * angle per (token, pair); y [n_tokens, H, D] contiguous, BPASS = 0 when ROT = D."""
    HALF: tl.constexpr = ROT // 2
    tokens = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    token_ok = tokens < n_tokens
    j = tl.arange(0, BHALF)
    pair_ok = token_ok[:, None] & (j < HALF)[None, :]
    position = tl.load(positions + tokens, mask=token_ok, other=0).to(tl.float32)
    angle = position[:, None] * tl.load(inv_freq + j, mask=j < HALF, other=0.0)[None, :]
    cos = tl.cos(angle)
    sin = SIGN * tl.sin(angle)
    x_tokens = x + tokens[:, None] * x_token_stride
    y_tokens = y + tokens[:, None] * (H * D)
    for h in range(H):
        x1 = x_tokens + h * x_head_stride + j[None, :]
        y1 = y_tokens + h * D + j[None, :]
        b_x1 = tl.load(x1, mask=pair_ok, other=0.0).to(tl.float32)
        b_x2 = tl.load(x1 + HALF, mask=pair_ok, other=0.0).to(tl.float32)
        tl.store(y1, (b_x1 * cos - b_x2 * sin).to(y.dtype.element_ty), mask=pair_ok)
        tl.store(y1 + HALF, (b_x2 * cos + b_x1 * sin).to(y.dtype.element_ty), mask=pair_ok)
        if BPASS > 0:
            c = ROT + tl.arange(0, BPASS)
            pass_ok = token_ok[:, None] & (c < D)[None, :]
            b_pass = tl.load(x_tokens + h * x_head_stride + c[None, :], mask=pass_ok, other=0.0)
            tl.store(y_tokens + h * D + c[None, :], b_pass, mask=pass_ok)


@functools.cache
def cached_inverse_frequencies(rot_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The float32 [rot_dim / 2] inverse frequencies, computed once per device (each layer and step reuses them)."""
    return inverse_frequencies(rot_dim, theta, device)


def rotate(src: torch.Tensor, positions: torch.Tensor, rot_dim: int, theta: float, sign: int) -> torch.Tensor:
    """src [..., L, H, D] rotated by sign * angle (sign -1: the transpose, the backward) into a fresh tensor."""
    H, D = src.shape[-2:]
    rows = src.reshape(-1, H, D)  # a view unless the leading dims do not flatten
    if rows.stride(2) != 1:
        rows = rows.contiguous()
    out = new_output(src.shape, src.dtype, src.device)
    n_tokens = rows.shape[0]
    if n_tokens > 0:
        BT, warps = block_tokens(n_tokens, D, src.device)
        pass_channels = D - rot_dim
        _rope_kernel[(triton.cdiv(n_tokens, BT),)](
            rows, positions.reshape(-1).contiguous(), cached_inverse_frequencies(rot_dim, theta, src.device), out,
            n_tokens, rows.stride(0), rows.stride(1),
            H=H, D=D, ROT=rot_dim, SIGN=sign, BT=BT, BHALF=triton.next_power_of_2(rot_dim // 2),
            BPASS=triton.next_power_of_2(pass_channels) if pass_channels else 0, num_warps=warps)
    return out


class RoPEFunction(torch.autograd.Function):
    """y = RoPE(x) at positions; dx = RoPE^T(dy) (positions are all that is saved)."""

    @staticmethod
    def forward(ctx, x, positions, rot_dim, theta):
        ctx.save_for_backward(positions)
        ctx.rot_dim, ctx.theta = rot_dim, theta
        return rotate(x, positions, rot_dim, theta, 1)

    @staticmethod
    def backward(ctx, dy):
        (positions,) = ctx.saved_tensors
        return rotate(dy, positions, ctx.rot_dim, ctx.theta, -1), None, None, None


def check_input(x: torch.Tensor, positions: torch.Tensor, rot_dim: int) -> None:
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"x must be [..., L, H, D]; got shape {tuple(x.shape)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor; got {positions.dtype}")
    if positions.shape != x.shape[:-2]:
        raise ValueError(f"positions must be [..., L] = x.shape[:-2] = {tuple(x.shape[:-2])}; "
                         f"got {tuple(positions.shape)}")
    if positions.device != x.device:
        raise ValueError(f"positions must be on x's device {x.device}; got {positions.device}")
    if rot_dim < 0 or rot_dim % 2 or rot_dim > x.shape[-1]:
        raise ValueError(f"rot_dim must be even and in [0, D = {x.shape[-1]}]; got {rot_dim}")


def rope(x: torch.Tensor, positions: torch.Tensor, rot_dim: int, theta: float) -> torch.Tensor:
    """RoPE (rotate-half) on the first rot_dim channels of x [..., L, H, D] (rows and heads may be strided) at
    positions [..., L] (integers) -> [..., L, H, D] in x's dtype; x itself when rot_dim = 0. The Triton kernels where
    ``use_triton(x)`` and the dtype is float32, bfloat16 or float16; the torch formula (reference.py, float32 math)
    elsewhere, float64 included."""
    check_input(x, positions, rot_dim)
    if rot_dim == 0:
        return x
    if use_triton(x) and x.dtype in KERNEL_DTYPES:
        return RoPEFunction.apply(x, positions, rot_dim, float(theta))
    return rope_reference(x, positions, rot_dim, theta)
