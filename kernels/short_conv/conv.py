"""Short causal depthwise convolution with document resets and a halo, fused with SiLU: Triton forward and backward.

    z[r, t, c] = sum_{j < W} w[c, j] x[r, t - (W-1) + j, c] [doc[r, t - (W-1) + j] == doc[r, t]]      (reference.py)
    y = silu(z) = z sigmoid(z)   (or y = z)

Positions -(W-1) .. -1 read the halo (the previous context-parallel rank's last W - 1 inputs, with their document
ids); without a halo they read zero. Backward, with dz = dy silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigmoid(z):

    dx[t]    = sum_{s < W} w[c, W-1-s] dz[t + s] [doc[t + s] == doc[t]]     (t + s < N; halo slots t < 0 alike)
    dw[c, j] = sum_t dz[t] x[t - (W-1) + j] [doc[t - (W-1) + j] == doc[t]]

Memory traffic is the point (the op does ~2W flops per element): the forward reads x once (its W shifted tile
loads after the first hit the L1/L2 cache) and writes y; the backward reads x and dy and writes dx. Nothing else of
size [R, N, C] is stored or read: a backward tile of BT tokens recomputes z (SiLU's derivative needs it) and dz once,
and takes dz[t + s] by shifting the tile's rows in registers (tl.gather), so it yields dx for its first BT - (W-1)
tokens (tiles overlap by W - 1 tokens). Each backward program walks ``blocks_per_program`` tiles of a row, summing
its weight-gradient partial in registers; the float32 partials ([programs, W, C], a few MB) are summed in torch
afterwards: deterministic, no atomics. Accumulation is float32; the weight is read as float32.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..common import new_output, use_triton
from .reference import causal_short_conv_reference

MAX_KERNEL_SIZE = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 takes the torch path (the oracle's precision)


@dataclasses.dataclass(frozen=True)
class Tiles:
    tokens: int  # BT: a power of two >= 16 (a backward tile yields BT - (W-1) tokens; its halo pass needs >= 2 (W-1))
    channels: int  # BC: channels per tile, a power of two
    warps: int
    blocks_per_program: int = 1  # backward: consecutive token tiles one program walks (its weight-gradient partial)


# CUDA tiles. Forward from sm_90 register counts (W = 4, halo and SiLU): 123 registers, 2 programs of 8 warps per SM.
# Backward measured on an H100 (benchmarks/NOTES.md, "Short-conv backward tiles"): 64 x 32 at 8 warps (128 registers,
# 16 resident warps per SM) ran fwd+bwd 0.82x / 0.95x the time of 32 x 64 at 4 warps (255 registers) at 16k / 65k.
TUNING = {"forward": Tiles(64, 64, 8), "backward": Tiles(64, 32, 8, 8)}
# Under the interpreter each tile step costs milliseconds: few, large tiles (a tiny model's conv is one per row).
INTERPRETER_TUNING = {"forward": Tiles(64, 64, 1), "backward": Tiles(64, 64, 1, 4)}


def _tiles(role: str, span: int, channels: int, device: torch.device) -> Tiles:
    """The role's tiles, shrunk to the tokens one row's tiles must span and to the channels."""
    tiles = (TUNING if device.type == "cuda" else INTERPRETER_TUNING)[role]
    return dataclasses.replace(tiles, tokens=min(tiles.tokens, max(16, triton.next_power_of_2(span))),
                               channels=min(tiles.channels, max(16, triton.next_power_of_2(channels))))


# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _tokens(x_row, halo_row, pos, chan, chan_ok, N, sx_t, sh_t, W: tl.constexpr, HAS_HALO: tl.constexpr):
    """x at token positions pos [BT] and channels chan [BC], float32 [BT, BC]: halo slot pos + W - 1 for
    -(W-1) <= pos < 0, zero where no token is."""
    at = pos.to(tl.int64)[:, None]
    inside = ((pos >= 0) & (pos < N))[:, None] & chan_ok[None, :]
    vals = tl.load(x_row + at * sx_t + chan[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_HALO:
        before = ((pos < 0) & (pos > -W))[:, None] & chan_ok[None, :]
        vals += tl.load(halo_row + (at + W - 1) * sh_t + chan[None, :], mask=before, other=0.0).to(tl.float32)
    return vals


@triton.jit
def _docs(doc_row, halo_doc_row, pos, N, W: tl.constexpr, HAS_HALO: tl.constexpr):
    """Document ids (int64 [BT]) of the tokens at pos; -1 where no token is (its value is zero there anyway)."""
    ids = tl.load(doc_row + pos, mask=(pos >= 0) & (pos < N), other=-1).to(tl.int64)
    if HAS_HALO:
        halo_ids = tl.load(halo_doc_row + pos + W - 1, mask=(pos < 0) & (pos > -W), other=-1).to(tl.int64)
        ids = tl.where(pos < 0, halo_ids, ids)
    return ids


@triton.jit
def _preactivation(x_row, halo_row, doc_row, halo_doc_row, w_col, pos, own, chan, chan_ok, N, sx_t, sh_t,
                   W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_HALO: tl.constexpr):
    """z at positions pos (documents own): the W taps, each dropped where its token is of another document.
    Returns (z, x at pos), float32 [BT, BC] each (the last tap is the token itself)."""
    z = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(W):
        src = pos - (W - 1) + j
        vals = _tokens(x_row, halo_row, src, chan, chan_ok, N, sx_t, sh_t, W, HAS_HALO)
        same = _docs(doc_row, halo_doc_row, src, N, W, HAS_HALO) == own
        z += tl.where(same[:, None], vals, 0.0) * tl.load(w_col + j, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    return z, vals


@triton.jit
def _short_conv_fwd_kernel(x, halo, doc, halo_doc, weight, y, N, C, tiles_per_row, sx_r, sx_t, sh_r, sh_t,
                           W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_HALO: tl.constexpr,
                           ACTIVATION: tl.constexpr):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    row = (pid // tiles_per_row).to(tl.int64)
    pos = (pid % tiles_per_row) * BT + tl.arange(0, BT)
    chan = pid_c * BC + tl.arange(0, BC)
    chan_ok = chan < C
    doc_row, halo_doc_row = doc + row * N, halo_doc + row * (W - 1)
    own = _docs(doc_row, halo_doc_row, pos, N, W, HAS_HALO)
    z, _ = _preactivation(x + row * sx_r, halo + row * sh_r, doc_row, halo_doc_row, weight + chan * W, pos, own,
                          chan, chan_ok, N, sx_t, sh_t, W, BT, BC, HAS_HALO)
    if ACTIVATION:
        z = z * tl.sigmoid(z)
    out = y + (row * N + pos.to(tl.int64))[:, None] * C + chan[None, :]
    tl.store(out, z.to(y.dtype.element_ty), mask=(pos < N)[:, None] & chan_ok[None, :])


@triton.jit
def _grad_tile(x_row, halo_row, doc_row, halo_doc_row, w_col, dy_row, dw, start, kept, chan, chan_ok, N, C, sx_t,
               sh_t, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_HALO: tl.constexpr,
               ACTIVATION: tl.constexpr):
    """Over the tokens t = start + i, i < BT: dz once (z recomputed), then for the first ``kept`` tokens (the other
    W - 1 only feed them: dx[t] reads dz[t .. t+W-1]) g_s[t] = dz[t+s] [doc[t+s] == doc[t]], the rows of dz shifted
    up by s inside the tile (a gather), dx[t] = sum_s w[W-1-s] g_s[t], and dw[W-1-s] += sum_t g_s[t] x[t]
    (the same terms as sum_t dz[t] x[t-s], indexed by the earlier token). Returns (dx [BT, BC], dw [WP, BC])."""
    rows = tl.arange(0, BT)
    pos = start + rows
    own = _docs(doc_row, halo_doc_row, pos, N, W, HAS_HALO)
    z, x_own = _preactivation(x_row, halo_row, doc_row, halo_doc_row, w_col, pos, own, chan, chan_ok, N, sx_t, sh_t,
                              W, BT, BC, HAS_HALO)
    inside = ((pos >= 0) & (pos < N))[:, None] & chan_ok[None, :]
    dz = tl.load(dy_row + pos.to(tl.int64)[:, None] * C + chan[None, :], mask=inside, other=0.0).to(tl.float32)
    if ACTIVATION:  # silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)
        sig = tl.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    x_kept = tl.where((rows < kept)[:, None], x_own, 0.0)
    taps = tl.arange(0, WP)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for s in tl.static_range(W):
        if s == 0:
            g = dz
        else:
            later = tl.broadcast_to(tl.minimum(rows + s, BT - 1)[:, None], (BT, BC))  # rows >= kept read garbage
            same = _docs(doc_row, halo_doc_row, pos + s, N, W, HAS_HALO) == own
            g = tl.where(same[:, None], tl.gather(dz, later, 0), 0.0)
        dx += g * tl.load(w_col + (W - 1 - s), mask=chan_ok, other=0.0).to(tl.float32)[None, :]
        dw += tl.where(taps[:, None] == W - 1 - s, tl.sum(g * x_kept, 0)[None, :], 0.0)
    return dx, dw


@triton.jit
def _short_conv_bwd_kernel(x, halo, doc, halo_doc, weight, dy, dx, dhalo, dw_partials, N, C, tiles_per_row,
                           groups_per_row, blocks_per_program, sx_r, sx_t, sh_r, sh_t, W: tl.constexpr,
                           WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_HALO: tl.constexpr,
                           HALO_GRAD: tl.constexpr, ACTIVATION: tl.constexpr):
    """Program (row, group of token tiles, channel tile): dx of its tiles (BT - (W-1) tokens each: tiles overlap by
    the W - 1 tokens whose dz the last kept ones read), the halo's terms (group 0), its dw partial."""
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    row = (pid // groups_per_row).to(tl.int64)
    group = pid % groups_per_row
    chan = pid_c * BC + tl.arange(0, BC)
    chan_ok = chan < C
    x_row, halo_row, w_col = x + row * sx_r, halo + row * sh_r, weight + chan * W
    doc_row, halo_doc_row, dy_row = doc + row * N, halo_doc + row * (W - 1), dy + row * N * C
    stride: tl.constexpr = BT - (W - 1)
    rows = tl.arange(0, BT)
    dw = tl.zeros((WP, BC), dtype=tl.float32)
    first = group * blocks_per_program
    for tile in range(first, tl.minimum(first + blocks_per_program, tiles_per_row)):
        dx_tile, dw = _grad_tile(x_row, halo_row, doc_row, halo_doc_row, w_col, dy_row, dw, tile * stride, stride,
                                 chan, chan_ok, N, C, sx_t, sh_t, W, WP, BT, BC, HAS_HALO, ACTIVATION)
        pos = tile * stride + rows
        out = dx + (row * N + pos.to(tl.int64))[:, None] * C + chan[None, :]
        tl.store(out, dx_tile.to(dx.dtype.element_ty), mask=((rows < stride) & (pos < N))[:, None] & chan_ok[None, :])
    if HAS_HALO:
        if group == 0:  # tokens -(W-1) .. -1: the halo's gradient and its terms of dw
            dh, dw = _grad_tile(x_row, halo_row, doc_row, halo_doc_row, w_col, dy_row, dw, 1 - W, W - 1, chan,
                                chan_ok, N, C, sx_t, sh_t, W, WP, BT, BC, HAS_HALO, ACTIVATION)
            if HALO_GRAD:
                out = dhalo + (row * (W - 1) + rows)[:, None] * C + chan[None, :]
                tl.store(out, dh.to(dhalo.dtype.element_ty), mask=(rows < W - 1)[:, None] & chan_ok[None, :])
    taps = tl.arange(0, WP)
    out = dw_partials + (pid.to(tl.int64) * W + taps[:, None]) * C + chan[None, :]
    tl.store(out, dw, mask=(taps < W)[:, None] & chan_ok[None, :])


# ------------------------------------------------------------------------------------------------ autograd


class CausalShortConvFunction(torch.autograd.Function):
    """x [R, N, C], weight [C, W], doc_ids [R, N], halo [R, W-1, C] or None, halo_doc_ids [R, W-1] or None
    -> y [R, N, C] in x's dtype. Gradients to x, weight and halo."""

    @staticmethod
    def forward(ctx, x, weight, doc_ids, halo, halo_doc_ids, activation: bool):
        rows, length, channels = x.shape
        kernel_size = weight.shape[1]
        x = x if x.stride(2) == 1 else x.contiguous()  # rows and tokens may be strided (a chunk of a projection)
        weight, doc_ids = weight.contiguous(), doc_ids.contiguous()
        has_halo = halo is not None and kernel_size > 1  # W = 1 reads no halo
        if has_halo:
            halo, halo_doc_ids = halo.contiguous(), halo_doc_ids.contiguous()
        y = new_output(x.shape, x.dtype, x.device)
        tiles = _tiles("forward", length, channels, x.device)
        tiles_per_row = triton.cdiv(length, tiles.tokens)
        grid = (rows * tiles_per_row, triton.cdiv(channels, tiles.channels))
        _short_conv_fwd_kernel[grid](
            x, halo if has_halo else x, doc_ids, halo_doc_ids if has_halo else doc_ids, weight, y, length, channels,
            tiles_per_row, x.stride(0), x.stride(1), *(halo.stride()[:2] if has_halo else (0, 0)), W=kernel_size,
            BT=tiles.tokens, BC=tiles.channels, HAS_HALO=has_halo, ACTIVATION=activation, num_warps=tiles.warps)
        ctx.save_for_backward(x, weight, doc_ids, *((halo, halo_doc_ids) if has_halo else ()))
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, doc_ids, *halo_parts = ctx.saved_tensors
        halo, halo_doc_ids = halo_parts if halo_parts else (None, None)
        rows, length, channels = x.shape
        kernel_size = weight.shape[1]
        halo_grad = halo is not None and ctx.needs_input_grad[3]
        dy = dy.contiguous()
        tiles = _tiles("backward", length + kernel_size - 1, channels, x.device)
        tiles_per_row = triton.cdiv(length, tiles.tokens - (kernel_size - 1))
        groups_per_row = triton.cdiv(tiles_per_row, tiles.blocks_per_program)
        dx = new_output(x.shape, x.dtype, x.device)
        dhalo = new_output(halo.shape, halo.dtype, halo.device) if halo_grad else None
        partials = new_output((rows * groups_per_row, kernel_size, channels), torch.float32, x.device)
        grid = (rows * groups_per_row, triton.cdiv(channels, tiles.channels))
        _short_conv_bwd_kernel[grid](
            x, halo if halo is not None else x, doc_ids, halo_doc_ids if halo is not None else doc_ids, weight, dy, dx,
            dhalo if halo_grad else dx, partials, length, channels, tiles_per_row, groups_per_row,
            tiles.blocks_per_program, x.stride(0), x.stride(1), *(halo.stride()[:2] if halo is not None else (0, 0)),
            W=kernel_size, WP=max(2, triton.next_power_of_2(kernel_size)), BT=tiles.tokens, BC=tiles.channels,
            HAS_HALO=halo is not None, HALO_GRAD=halo_grad, ACTIVATION=ctx.activation, num_warps=tiles.warps)
        dweight = partials.sum(0).t().contiguous().to(weight.dtype)
        return dx, dweight, None, dhalo, None, None


# --------------------------------------------------------------------------------------------- public entry


def _check(x, weight, doc_ids, halo, halo_doc_ids) -> None:
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ints = (torch.int32, torch.int64)
    if x.dim() != 3 or x.dtype not in floats:
        raise ValueError(f"causal_short_conv takes x [R, N, C] of {floats}; got {tuple(x.shape)} {x.dtype}")
    rows, length, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels or not 1 <= weight.shape[1] <= MAX_KERNEL_SIZE \
            or weight.dtype not in floats:
        raise ValueError(f"weight must be [C, W] with C = {channels}, 1 <= W <= {MAX_KERNEL_SIZE}, floating; "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    if tuple(doc_ids.shape) != (rows, length) or doc_ids.dtype not in ints:
        raise ValueError(f"doc_ids must be int32/int64 [R, N] = [{rows}, {length}]; "
                         f"got {tuple(doc_ids.shape)} {doc_ids.dtype}")
    if (halo is None) != (halo_doc_ids is None):
        raise ValueError("halo and halo_doc_ids come together: give both or neither")
    width = weight.shape[1] - 1
    if halo is not None:
        if tuple(halo.shape) != (rows, width, channels) or halo.dtype not in floats:
            raise ValueError(f"halo must be floating [R, W-1, C] = [{rows}, {width}, {channels}]; "
                             f"got {tuple(halo.shape)} {halo.dtype}")
        if tuple(halo_doc_ids.shape) != (rows, width) or halo_doc_ids.dtype not in ints:
            raise ValueError(f"halo_doc_ids must be int32/int64 [R, W-1] = [{rows}, {width}]; "
                             f"got {tuple(halo_doc_ids.shape)} {halo_doc_ids.dtype}")
    tensors = [weight, doc_ids] + ([halo, halo_doc_ids] if halo is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"causal_short_conv's tensors must all be on x's device {x.device}; "
                         f"got {[str(t.device) for t in tensors]}")


def causal_short_conv(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor, halo: torch.Tensor | None = None,
                      halo_doc_ids: torch.Tensor | None = None, activation: bool = True) -> torch.Tensor:
    """y = silu(z) (z without ``activation``), z[r, t, c] = sum_j w[c, j] x[r, t-(W-1)+j, c], taps of another
    document dropped (see reference.py).

    x [R, N, C] (float32, bfloat16, float16; float64 on the torch path); weight [C, W], 1 <= W <= 8, the last tap on
    the current token; doc_ids [R, N] int32/int64, the document of each token; halo [R, W-1, C] with halo_doc_ids
    [R, W-1]: the W - 1 inputs before each row (the previous context-parallel rank's last ones), or None for zeros.
    Returns y [R, N, C] in x's dtype, differentiable in x, weight and halo.

    Where ``use_triton(x)`` and x is not float64: the fused Triton kernels (float32 accumulation); elsewhere the
    torch shifted sum of reference.py, in x's dtype.
    """
    _check(x, weight, doc_ids, halo, halo_doc_ids)
    if use_triton(x) and x.dtype in KERNEL_DTYPES:
        return CausalShortConvFunction.apply(x, weight, doc_ids, halo, halo_doc_ids, activation)
    return causal_short_conv_reference(x, weight, doc_ids, halo, halo_doc_ids, activation)
