"""Chunkwise gated delta rule: Triton forward and backward kernels, chunk of 64 tokens, UT/WY form, and the
sequence split into segments that run in parallel and are joined by the boundary-state algebra of
parallel/state_passing.py.

Per value head, with chunk c of C = 64 tokens entering with state h (K x V):
  gc_i = sum_{j<=i} g_j inside the chunk,  e_i = exp(gc_i),  gl = gc of the chunk's last token;
  A_ij = beta_i (k_i . k_j) exp(gc_i - gc_j) for i > j (else 0),  T = (I + A)^-1      (the UT transform: the
        WY representation of the chunk's product of alpha_t (I - beta_t k_t k_t^T) from the paper's Eq. 10);
  w = T diag(beta) (k * e),   u = T diag(beta) v;
  pseudo-values  vn = u - w h;
  o = scale [ (q * e) h + P vn ],  P_ij = (q_i . k_j) exp(gc_i - gc_j) for i >= j (else 0);
  h_next = exp(gl) h + (k * exp(gl - gc))^T vn  =  M_c h + E_c,   M_c = exp(gl) I - (k * exp(gl - gc))^T w.

Parallel along the sequence. The chunks of a sequence are cut into segments of L chunks. Since h_next is affine
in h, a segment maps its entering state S to M S + E. Three launches replace the chunk-by-chunk pass:
  1. summary (parallel over segments): run each segment from the state [I | 0] with values [0 | u]: the state
     columns evolve independently, so the result is [M | E] (the identity columns give M, the u columns E);
  2. combine (sequential over segments only): S_in(s+1) = M_s S_in(s) + E_s, from the initial state;
  3. state scan (parallel over segments): rerun each segment from its true S_in, writing every chunk's h and vn.
Depth L + (chunks / L) + L instead of chunks, and more programs to fill the GPU. The scans do only the two
dependent products per chunk; the outputs come from a fully parallel kernel over chunks.

Backward. With D the gradient of the loss with respect to the state entering a chunk, dh_c that leaving it:
  dvn = scale P^T do + (k * exp(gl - gc)) dh_c,        D = exp(gl) dh_c + scale (q * e)^T do - w^T dvn
  = M_c^T dh_c + G_c: the same algebra reversed, so the same three steps run backwards (M^T from the forward
summary, G from a summary of the gradients); scale P^T do, which does not depend on the state, comes from a
parallel kernel first, and the last scan stores each chunk's dh and dvn. Then two launches of one program per
chunk form the input gradients (_grads_qk_kernel, _grads_wy_kernel: split in two so that each fits the
registers), or with FUSED_GRADS one launch that runs both halves in turn in each program (_grads_kernel). Kept
from forward to backward: the inputs, each segment's entering state and M, and (while KEEP_FORWARD_STATES) gc, T,
w and every chunk's h and vn, else recomputed.

Implementation notes. Never transpose a tl.dot result (tl.trans of an MMA-layout tensor feeding another dot is
miscompiled on Hopper by Triton 3.2-3.6; flash-linear-attention issue #640, triton issue #6124): transposed
products are formed as their own dots of loaded operands (dS and dS^T in _grads_qk_kernel), and the C x C matrix
of _grads_wy_kernel needed both ways goes through a scratch buffer. Dot operands are in the input dtype,
accumulators and states in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from lctrain.kernels.common import chunk_map, device_table, host_offsets, new_output, use_triton
from lctrain.kernels.gated_delta.checks import check_inputs
from lctrain.kernels.gated_delta.chunk_torch import chunk_gated_delta_rule_torch

CHUNK = 64


# ----------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _diag_block_inverse_kernel(k, g, beta, Y, chunks, seq_end, H, HV, K: tl.constexpr, BK: tl.constexpr,
                               PRECISION: tl.constexpr):
    """(I + D)^-1 for one 16 x 16 diagonal block D of a chunk's A (module docstring), by Gaussian elimination
    (15 pivots) in a single warp: no cross-warp reductions. Writes its 16 columns to Y [B, T, HV, 16] (float32).
    The decays only need g's cumulative sums inside the block (their differences)."""
    i_b, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    r = tl.arange(0, 16)
    tok, _, t0, eos = _chunk_tokens(chunks, seq_end, i_b // 4)
    tok = t0 + (i_b % 4) * 16 + r
    valid = tok < eos
    ck = tl.arange(0, BK)
    b_k = tl.load(k + (tok * H + i_h)[:, None] * K + ck[None, :], mask=valid[:, None] & (ck < K)[None, :], other=0.0)
    b_gc = tl.cumsum(tl.load(g + tok * HV + i_hv, mask=valid, other=0.0), axis=0)
    b_beta = tl.load(beta + tok * HV + i_hv, mask=valid, other=0.0)
    strict = r[:, None] > r[None, :]
    b_A = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    b_A = tl.where(strict, b_A * tl.exp(tl.where(strict, b_gc[:, None] - b_gc[None, :], 0.0)) * b_beta[:, None], 0.0)
    b_Y = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for m in tl.static_range(15):
        # row i -= A[i, m] * (row m), for the rows below the pivot m
        a_col = tl.sum(tl.where(r[None, :] == m, b_A, 0.0), axis=1)
        y_row = tl.sum(tl.where(r[:, None] == m, b_Y, 0.0), axis=0)
        b_Y -= a_col[:, None] * y_row[None, :]
    tl.store(Y + (tok * HV + i_hv)[:, None] * 16 + r[None, :], b_Y, mask=valid[:, None])


@triton.jit
def _transpose_via_scratch(x, scratch):
    """x^T for a 64 x 64 float32 x computed by tl.dot (see the module notes), through this program's scratch."""
    r = tl.arange(0, 64)
    tl.store(scratch + r[:, None] * 64 + r[None, :], x)
    tl.debug_barrier()
    xt = tl.load(scratch + r[None, :] * 64 + r[:, None])
    tl.debug_barrier()
    return xt


@triton.jit
def _chunk_tokens(chunks, seq_end, i_c):
    """Flat token indices of chunk i_c and their validity (the last chunk of a sequence may be partial)."""
    seq = tl.load(chunks + i_c * 3)
    t0 = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
    eos = tl.load(seq_end + seq).to(tl.int64)
    tok = t0 + tl.arange(0, 64)
    return tok, tok < eos, t0, eos


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _wy_prepare_kernel(k, v, g, beta, Y, gc, A_inv, w, u, chunks, seq_end,
                       H, HV, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PRECISION: tl.constexpr):
    """Per (chunk, value head): gc = chunk-local cumsum of g, T = (I + A)^-1, w, u.

    With Y = (I + D)^-1 for the diagonal 16 x 16 blocks D (from _diag_block_inverse_kernel) and N the part of A
    below them, I + A = (I + D)(I + Y N), and B = Y N is nilpotent (B^4 = 0): T = (I - B)(I + B^2) Y, the terms
    of blocked forward substitution. PRECISION is the float32 products' input precision: "tf32x3" keeps float32
    inputs' accuracy, "tf32" is enough for 16-bit inputs (T is rounded to them).
    """
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    tok, valid, t0, eos = _chunk_tokens(chunks, seq_end, i_c)
    r = tl.arange(0, 64)
    b_g = tl.load(g + tok * HV + i_hv, mask=valid, other=0.0)
    b_beta = tl.load(beta + tok * HV + i_hv, mask=valid, other=0.0)
    b_gc = tl.cumsum(b_g, axis=0)
    tl.store(gc + tok * HV + i_hv, b_gc, mask=valid)
    ck = tl.arange(0, BK)
    b_k = tl.load(k + (tok * H + i_h)[:, None] * K + ck[None, :], mask=valid[:, None] & (ck < K)[None, :], other=0.0)
    same_block = (r // 16)[:, None] == (r // 16)[None, :]
    below = r[:, None] // 16 > r[None, :] // 16
    b_N = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    b_N = tl.where(below, b_N * tl.exp(tl.where(below, b_gc[:, None] - b_gc[None, :], 0.0)) * b_beta[:, None], 0.0)
    b_Y = tl.load(Y + (tok * HV + i_hv)[:, None] * 16 + (r % 16)[None, :], mask=same_block & valid[:, None],
                  other=0.0)
    b_B = tl.dot(b_Y, b_N, input_precision=PRECISION)
    b_B2 = tl.dot(b_B, b_B, input_precision=PRECISION)
    b_X = tl.where(r[:, None] == r[None, :], 1.0, 0.0) - b_B
    b_X += tl.dot(b_X, b_B2, input_precision=PRECISION)
    b_T = tl.dot(b_X, b_Y, input_precision=PRECISION)
    tl.store(A_inv + (tok * HV + i_hv)[:, None] * 64 + r[None, :], b_T.to(DT), mask=valid[:, None])
    b_Td = b_T.to(DT)
    b_kw = (b_k * (b_beta * tl.exp(b_gc))[:, None]).to(DT)
    b_w = tl.dot(b_Td, b_kw)
    tl.store(w + (tok * HV + i_hv)[:, None] * K + ck[None, :], b_w.to(DT), mask=valid[:, None] & (ck < K)[None, :])
    for i_v in range(NV):
        cv = i_v * BV + tl.arange(0, BV)
        m = valid[:, None] & (cv < V)[None, :]
        b_v = tl.load(v + (tok * HV + i_hv)[:, None] * V + cv[None, :], mask=m, other=0.0)
        b_u = tl.dot(b_Td, (b_v * b_beta[:, None]).to(DT))
        tl.store(u + (tok * HV + i_hv)[:, None] * V + cv[None, :], b_u.to(DT), mask=m)


@triton.jit
def _segment(segs, i_s):
    """Row of the segment table: sequence, first chunk row, chunk count, first token, sequence start and end."""
    p = segs + i_s * 6
    return (tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3).to(tl.int64), tl.load(p + 4).to(tl.int64),
            tl.load(p + 5).to(tl.int64))


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _fwd_scan_kernel(k, w, u, gc, h, vn, seg_init, summary, final, segs,
                     H, HV, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr, NBM: tl.constexpr,
                     SUMMARY: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
    """Run one segment's chunks for BV state columns of one value head: per chunk two dependent products,
    vn = u - w S and S <- exp(gl) S + (k * exp(gl - gc))^T vn.

    SUMMARY: start from [I | 0] (column blocks < NBM are identity columns, the rest u's columns) and write the
    segment's [M | E] to summary [S, HV, K, K + V]. Otherwise start from seg_init[s] (or 0), write each chunk's
    entering state h[chunk] and pseudo-values vn, and at a sequence's end final[seq] (STORE_FINAL).
    """
    # the NB column blocks of one segment are neighbours in launch order: they read the same k, w
    i_s, i_b, i_hv = tl.program_id(0).to(tl.int64) // NB, tl.program_id(0) % NB, tl.program_id(1)
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    seq, c0, nc, t_start, bos, eos = _segment(segs, i_s)
    seq = seq.to(tl.int64)
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    cb = tl.arange(0, BV)
    kmask = rk < K
    if SUMMARY:
        is_m = i_b < NBM
        col0 = tl.where(is_m, i_b * BV, (i_b - NBM) * BV)
        width = tl.where(is_m, K, V)
        cmask = col0 + cb < width
        S = tl.where((rk[:, None] == col0 + cb[None, :]) & (i_b * BV + cb < NBM * BV)[None, :], 1.0, 0.0)
        ucols = cmask & (i_b * BV + cb >= NBM * BV)  # the identity columns see zero values
    else:
        col0 = i_b * BV
        cmask = col0 + cb < V
        ucols = cmask
        if HAS_INIT:
            S = tl.load(seg_init + ((i_s * HV + i_hv) * K + rk[:, None]) * V + col0 + cb[None, :],
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(nc):
        t0 = t_start + j * 64
        tok = t0 + r
        valid = tok < eos
        b_gc = tl.load(gc + tok * HV + i_hv, mask=valid, other=0.0)
        last = tl.minimum(eos - t0, 64) - 1
        b_gl = tl.load(gc + (t0 + last) * HV + i_hv)
        km = valid[:, None] & kmask[None, :]
        b_k = tl.load(k + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
        b_w = tl.load(w + (tok * HV + i_hv)[:, None] * K + rk[None, :], mask=km, other=0.0)
        b_u = tl.load(u + (tok * HV + i_hv)[:, None] * V + col0 + cb[None, :],
                      mask=valid[:, None] & ucols[None, :], other=0.0)
        S_d = S.to(DT)
        b_vn = (b_u.to(tl.float32) - tl.dot(b_w, S_d)).to(DT)
        if not SUMMARY:
            tl.store(h + (((c0 + j).to(tl.int64) * HV + i_hv) * K + rk[:, None]) * V + col0 + cb[None, :],
                     S_d.to(h.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])
            tl.store(vn + (tok * HV + i_hv)[:, None] * V + col0 + cb[None, :], b_vn.to(vn.dtype.element_ty),
                     mask=valid[:, None] & cmask[None, :])
        to_end = tl.where(valid, tl.exp(tl.where(valid, b_gl - b_gc, 0.0)), 0.0)
        b_kd = (b_k * to_end[:, None]).to(DT)
        S = S * tl.exp(b_gl) + tl.dot(tl.trans(b_kd), b_vn)
    if SUMMARY:
        out_col = tl.where(is_m, col0, K + col0)
        tl.store(summary + ((i_s * HV + i_hv) * K + rk[:, None]) * (K + V) + out_col + cb[None, :], S,
                 mask=kmask[:, None] & cmask[None, :])
    if STORE_FINAL:
        if t_start + nc * 64 >= eos:
            tl.store(final + ((seq * HV + i_hv) * K + rk[:, None]) * V + col0 + cb[None, :], S,
                     mask=kmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _output_kernel(q, k, gc, h, vn, o, chunks, seq_end, scale, H, HV, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    """o = scale [(q * e) h + P vn] for one chunk and BV value columns, from the stored h and vn."""
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    tok, valid, t0, eos = _chunk_tokens(chunks, seq_end, i_c)
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    km = valid[:, None] & (rk < K)[None, :]
    vm = valid[:, None] & (cv < V)[None, :]
    b_gc = tl.load(gc + tok * HV + i_hv, mask=valid, other=0.0)
    b_q = tl.load(q + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_k = tl.load(k + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + rk[:, None]) * V + cv[None, :],
                  mask=(rk < K)[:, None] & (cv < V)[None, :], other=0.0)
    b_vn = tl.load(vn + (tok * HV + i_hv)[:, None] * V + cv[None, :], mask=vm, other=0.0)
    incl = (r[:, None] >= r[None, :]) & valid[:, None]
    b_P = tl.dot(b_q, tl.trans(b_k))
    b_P = tl.where(incl, b_P * tl.exp(tl.where(incl, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0).to(DT)
    b_qd = (b_q * tl.exp(b_gc)[:, None]).to(DT)
    b_o = tl.dot(b_qd, b_h) + tl.dot(b_P, b_vn)
    tl.store(o + (tok * HV + i_hv)[:, None] * V + cv[None, :], (scale * b_o).to(o.dtype.element_ty), mask=vm)


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _local_dvn_kernel(q, k, gc, do, dvl, chunks, seq_end, scale, H, HV, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    """The part of dvn from the chunk's own outputs, scale P^T do, for one chunk and BV value columns: it does not
    depend on the state, so the backward scans only add (k * exp(gl - gc)) dh to it."""
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    tok, valid, t0, eos = _chunk_tokens(chunks, seq_end, i_c)
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    km = valid[:, None] & (rk < K)[None, :]
    vm = valid[:, None] & (cv < V)[None, :]
    b_gc = tl.load(gc + tok * HV + i_hv, mask=valid, other=0.0)
    b_q = tl.load(q + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_k = tl.load(k + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_do = tl.load(do + (tok * HV + i_hv)[:, None] * V + cv[None, :], mask=vm, other=0.0)
    # P^T[j, i] = (k_j . q_i) exp(gc_i - gc_j) for i >= j, formed directly (no transposed dot result)
    upper = (r[:, None] <= r[None, :]) & valid[None, :]
    b_PT = tl.dot(b_k, tl.trans(b_q))
    b_PT = tl.where(upper, b_PT * tl.exp(tl.where(upper, b_gc[None, :] - b_gc[:, None], 0.0)), 0.0).to(DT)
    tl.store(dvl + (tok * HV + i_hv)[:, None] * V + cv[None, :], (scale * tl.dot(b_PT, b_do)).to(dvl.dtype.element_ty),
             mask=vm)


@triton.jit(do_not_specialize=["HV"])  # one compile for every head count
def _combine_kernel(summary, affine, affine_stride, init, seg_state, seq_segs,
                    HV, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    KB: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """Fold the segments of one sequence: X(next) = M X + F, writing each segment's entering X to seg_state.

    Forward: X is the state, M and F = E from the forward summary, segments in order, X(0) = the initial state.
    REVERSE: X is the gradient of the state leaving a segment, M^T read from the forward summary, F = G from the
    gradient summary, segments in reverse order, X(last) = the final state's gradient. ``affine`` points at F's
    first column, ``affine_stride`` is F's row stride. M X is summed over row blocks of X re-read from seg_state.
    """
    n, i_hv, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    s0 = tl.load(seq_segs + n * 2)
    ns = tl.load(seq_segs + n * 2 + 1)
    rk = tl.arange(0, BK)
    rb = tl.arange(0, KB)
    cv = i_v * BV + tl.arange(0, BV)
    xmask = (rk < K)[:, None] & (cv < V)[None, :]
    if HAS_INIT:
        X = tl.load(init + ((n * HV + i_hv) * K + rk[:, None]) * V + cv[None, :], mask=xmask, other=0.0)
    else:
        X = tl.zeros([BK, BV], dtype=tl.float32)
    for jj in range(ns - 1):
        if REVERSE:
            s = (s0 + ns - 1 - jj).to(tl.int64)
        else:
            s = (s0 + jj).to(tl.int64)
        here = seg_state + ((s * HV + i_hv) * K) * V
        tl.store(here + rk[:, None] * V + cv[None, :], X, mask=xmask)
        tl.debug_barrier()
        X = tl.load(affine + ((s * HV + i_hv) * K + rk[:, None]) * affine_stride + cv[None, :], mask=xmask, other=0.0)
        m_base = summary + (s * HV + i_hv) * K * (K + V)
        for kb in tl.static_range(BK // KB):
            cols = kb * KB + rb
            mm = (rk < K)[:, None] & (cols < K)[None, :]
            if REVERSE:
                b_M = tl.load(m_base + cols[None, :] * (K + V) + rk[:, None], mask=mm, other=0.0)
            else:
                b_M = tl.load(m_base + rk[:, None] * (K + V) + cols[None, :], mask=mm, other=0.0)
            b_X = tl.load(here + cols[:, None] * V + cv[None, :], mask=(cols < K)[:, None] & (cv < V)[None, :],
                          other=0.0)
            X += tl.dot(b_M, b_X, input_precision="tf32x3")
        tl.debug_barrier()
    if REVERSE:
        s = s0.to(tl.int64)
    else:
        s = (s0 + ns - 1).to(tl.int64)
    tl.store(seg_state + ((s * HV + i_hv) * K + rk[:, None]) * V + cv[None, :], X, mask=xmask)


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _bwd_scan_kernel(q, k, w, gc, do, dvl, dh, dvn, seg_dinit, gsum, dh0, segs, scale,
                     H, HV, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr,
                     SUMMARY: tl.constexpr, STORE_DH: tl.constexpr, HAS_INIT: tl.constexpr, STORE_DH0: tl.constexpr):
    """Run one segment's chunks backwards for BV columns of the state gradient D (module docstring).

    Starts from seg_dinit[s] (the gradient of the state leaving the segment) or 0. SUMMARY writes the segment's
    G to gsum; STORE_DH writes the gradient of each chunk's leaving state to dh[chunk] and the gradient of its
    pseudo-values to dvn; STORE_DH0 writes the gradient of the initial state at a sequence's first segment.
    """
    i_s, i_v, i_hv = tl.program_id(0).to(tl.int64) // NB, tl.program_id(0) % NB, tl.program_id(1)
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    seq, c0, nc, t_start, bos, eos = _segment(segs, i_s)
    seq = seq.to(tl.int64)
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    kmask = rk < K
    smask = kmask[:, None] & (cv < V)[None, :]
    if HAS_INIT:
        D = tl.load(seg_dinit + ((i_s * HV + i_hv) * K + rk[:, None]) * V + cv[None, :], mask=smask, other=0.0)
    else:
        D = tl.zeros([BK, BV], dtype=tl.float32)
    for jj in range(nc):
        j = nc - 1 - jj
        t0 = t_start + j * 64
        tok = t0 + r
        valid = tok < eos
        if STORE_DH:
            tl.store(dh + (((c0 + j).to(tl.int64) * HV + i_hv) * K + rk[:, None]) * V + cv[None, :],
                     D.to(dh.dtype.element_ty), mask=smask)
        b_gc = tl.load(gc + tok * HV + i_hv, mask=valid, other=0.0)
        last = tl.minimum(eos - t0, 64) - 1
        b_gl = tl.load(gc + (t0 + last) * HV + i_hv)
        km = valid[:, None] & kmask[None, :]
        b_q = tl.load(q + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
        b_k = tl.load(k + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
        b_w = tl.load(w + (tok * HV + i_hv)[:, None] * K + rk[None, :], mask=km, other=0.0)
        b_do = tl.load(do + (tok * HV + i_hv)[:, None] * V + cv[None, :], mask=valid[:, None] & (cv < V)[None, :],
                       other=0.0)
        b_dvl = tl.load(dvl + (tok * HV + i_hv)[:, None] * V + cv[None, :], mask=valid[:, None] & (cv < V)[None, :],
                        other=0.0)
        to_end = tl.where(valid, tl.exp(tl.where(valid, b_gl - b_gc, 0.0)), 0.0)
        b_kd = (b_k * to_end[:, None]).to(DT)
        b_dvn = b_dvl.to(tl.float32) + tl.dot(b_kd, D.to(DT))
        if STORE_DH:
            tl.store(dvn + (tok * HV + i_hv)[:, None] * V + cv[None, :], b_dvn.to(dvn.dtype.element_ty),
                     mask=valid[:, None] & (cv < V)[None, :])
        b_qd = (b_q * tl.exp(b_gc)[:, None] * scale).to(DT)
        D = D * tl.exp(b_gl) + tl.dot(tl.trans(b_qd), b_do) - tl.dot(tl.trans(b_w), b_dvn.to(DT))
    if SUMMARY:
        tl.store(gsum + ((i_s * HV + i_hv) * K + rk[:, None]) * V + cv[None, :], D, mask=smask)
    if STORE_DH0:
        if t_start == bos:
            tl.store(dh0 + ((seq * HV + i_hv) * K + rk[:, None]) * V + cv[None, :], D, mask=smask)


@triton.jit
def _grads_qk_chunk(q, k, gc, h, dh, vn, do, dq, dk, dgc, chunks, seq_end, scale, i_c, i_hv,
                    H, HV, K: tl.constexpr, V: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """Backward, first half, for chunk i_c and value head i_hv: the gradients through the outputs and the leaving
    state.

    With dX the gradient of the loss with respect to X (module docstring for the forward), dS = do vn^T and
    dQK = scale dS * exp(gc_i - gc_j) [i >= j]:
        dq = scale (do h^T) * e + dQK k                     (final)
        dk = dQK^T q + (vn dh^T) * exp(gl - gc)             (completed by _grads_wy_kernel)
    and dgc, the gradient with respect to the cumulative log decays gc, from the same terms: scale dS * P moves
    gc_i up by its row sums and gc_j down by its column sums; (q * e) h, and exp(gl) h + (k * exp(gl - gc))^T vn.
    dS and dS^T are both formed as products of loaded operands (a 64 x 64 x V product more, no scratch round trip).
    """
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    tok, valid, t0, eos = _chunk_tokens(chunks, seq_end, i_c)
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    kmask = rk < K
    km = valid[:, None] & kmask[None, :]
    b_dq = tl.zeros([64, BK], dtype=tl.float32)  # do h^T
    b_dkh = tl.zeros([64, BK], dtype=tl.float32)  # vn dh^T
    b_dS = tl.zeros([64, 64], dtype=tl.float32)  # do vn^T
    b_dST = tl.zeros([64, 64], dtype=tl.float32)  # vn do^T
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # rows of sum(h * dh)
    for i_v in range(NV):
        cv = i_v * BV + tl.arange(0, BV)
        vm = valid[:, None] & (cv < V)[None, :]
        state_at = ((i_c.to(tl.int64) * HV + i_hv) * K + rk[:, None]) * V + cv[None, :]
        b_h = tl.load(h + state_at, mask=kmask[:, None] & (cv < V)[None, :], other=0.0)
        b_dh = tl.load(dh + state_at, mask=kmask[:, None] & (cv < V)[None, :], other=0.0)
        at = (tok * HV + i_hv)[:, None] * V + cv[None, :]
        b_vn = tl.load(vn + at, mask=vm, other=0.0)
        b_do = tl.load(do + at, mask=vm, other=0.0)
        b_dq += tl.dot(b_do, tl.trans(b_h))
        b_dkh += tl.dot(b_vn, tl.trans(b_dh))
        b_dS += tl.dot(b_do, tl.trans(b_vn))
        b_dST += tl.dot(b_vn, tl.trans(b_do))
        b_hdh += tl.sum(b_dh.to(tl.float32) * b_h.to(tl.float32), axis=1)
    b_gc = tl.load(gc + tok * HV + i_hv, mask=valid, other=0.0)
    last = tl.minimum(eos - t0, 64) - 1
    b_gl = tl.load(gc + (t0 + last) * HV + i_hv)
    b_e = tl.where(valid, tl.exp(b_gc), 0.0)
    to_end = tl.where(valid, tl.exp(tl.where(valid, b_gl - b_gc, 0.0)), 0.0)
    both = valid[:, None] & valid[None, :]
    incl = (r[:, None] >= r[None, :]) & both
    b_q = tl.load(q + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_k = tl.load(k + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_dQK = tl.where(incl, scale * b_dS * tl.exp(tl.where(incl, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
    b_Z = b_dQK * tl.dot(b_q, tl.trans(b_k))  # = scale dS * P
    b_dgc = tl.sum(b_Z, axis=1) - tl.sum(b_Z, axis=0)
    b_dgc += scale * tl.sum(b_dq * b_q.to(tl.float32), axis=1) * b_e
    b_dq = scale * b_dq * b_e[:, None] + tl.dot(b_dQK.to(DT), b_k)
    tl.store(dq + (tok * HV + i_hv)[:, None] * K + rk[None, :], b_dq.to(dq.dtype.element_ty), mask=km)
    upper = (r[:, None] <= r[None, :]) & both
    b_dQKT = tl.where(upper, scale * b_dST * tl.exp(tl.where(upper, b_gc[None, :] - b_gc[:, None], 0.0)), 0.0)
    leave = to_end * tl.sum(b_dkh * b_k.to(tl.float32), axis=1)  # through (k * exp(gl - gc))^T vn
    b_dk = tl.dot(b_dQKT.to(DT), b_q) + b_dkh * to_end[:, None]
    tl.store(dk + (tok * HV + i_hv)[:, None] * K + rk[None, :], b_dk.to(dk.dtype.element_ty), mask=km)
    b_dgc -= leave
    b_dgc += tl.where(r == last, tl.exp(b_gl) * tl.sum(b_hdh, axis=0) + tl.sum(leave, axis=0), 0.0)
    tl.store(dgc + tok * HV + i_hv, b_dgc, mask=valid)


@triton.jit
def _grads_wy_chunk(k, v, gc, beta, A_inv, h, dvn, dk, dv, dbeta, dgc, dg, scratch, chunks, seq_end, i_c, i_hv,
                    H, HV, K: tl.constexpr, V: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """Backward, second half, for chunk i_c and value head i_hv: through vn = u - w h and the UT transform.

    du = dvn, dw = -dvn h^T. With u = T diag(beta) v and w = T diag(beta) (k * e):
        dv = beta * (T^T du),   dX_w = T^T dw,   dT = du (beta v)^T + dw (beta e k)^T,   dA = -T^T dT T^T (i > j);
    A_ij = beta_i (k_i . k_j) exp(gc_i - gc_j): with E = dA * beta_i exp(gc_i - gc_j), dk += (E + E^T) k and
    dbeta_i += sum_j dA_ij (k_i . k_j) exp(gc_i - gc_j). Adds to the dk and dgc of _grads_qk_chunk; dg is the
    completed dgc summed from each position to the chunk's end.
    """
    i_h = i_hv // (HV // H)
    DT = k.dtype.element_ty
    tok, valid, t0, eos = _chunk_tokens(chunks, seq_end, i_c)
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    kmask = rk < K
    km = valid[:, None] & kmask[None, :]
    b_beta = tl.load(beta + tok * HV + i_hv, mask=valid, other=0.0)
    b_TT = tl.load(A_inv + (tok * HV + i_hv)[None, :] * 64 + r[:, None],
                   mask=valid[:, None] & valid[None, :], other=0.0)  # T^T
    b_dw = tl.zeros([64, BK], dtype=tl.float32)
    b_dT = tl.zeros([64, 64], dtype=tl.float32)
    b_dbeta = tl.zeros([64], dtype=tl.float32)
    for i_v in range(NV):
        cv = i_v * BV + tl.arange(0, BV)
        vm = valid[:, None] & (cv < V)[None, :]
        at = (tok * HV + i_hv)[:, None] * V + cv[None, :]
        b_dvn = tl.load(dvn + at, mask=vm, other=0.0)
        b_v = tl.load(v + at, mask=vm, other=0.0)
        b_h = tl.load(h + ((i_c.to(tl.int64) * HV + i_hv) * K + rk[:, None]) * V + cv[None, :],
                      mask=kmask[:, None] & (cv < V)[None, :], other=0.0)
        b_dw -= tl.dot(b_dvn, tl.trans(b_h))
        b_dXu = tl.dot(b_TT, b_dvn)
        tl.store(dv + at, (b_dXu * b_beta[:, None]).to(dv.dtype.element_ty), mask=vm)
        b_dbeta += tl.sum(b_dXu * b_v.to(tl.float32), axis=1)
        b_dT += tl.dot(b_dvn, tl.trans((b_v * b_beta[:, None]).to(DT)))
    b_gc = tl.load(gc + tok * HV + i_hv, mask=valid, other=0.0)
    b_e = tl.where(valid, tl.exp(b_gc), 0.0)
    b_bek = b_beta * b_e
    b_k = tl.load(k + (tok * H + i_h)[:, None] * K + rk[None, :], mask=km, other=0.0)
    b_dXw = tl.dot(b_TT, b_dw.to(DT))
    b_dk = b_dXw * b_bek[:, None]
    b_dXw_k = tl.sum(b_dXw * b_k.to(tl.float32), axis=1)
    b_dbeta += b_dXw_k * b_e
    b_dgc = b_dXw_k * b_bek
    # (beta e k)^T from k loaded transposed (a product of loaded operands, as the module notes prefer)
    b_kT = tl.load(k + (tok * H + i_h)[None, :] * K + rk[:, None], mask=tl.trans(km), other=0.0)
    b_dT += tl.dot(b_dw.to(DT), (b_kT * b_bek[None, :]).to(DT))
    strict = (r[:, None] > r[None, :]) & valid[:, None] & valid[None, :]
    b_dA = -tl.dot(tl.dot(b_TT, b_dT.to(DT)).to(DT), b_TT)
    b_dA = tl.where(strict, b_dA * tl.exp(tl.where(strict, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
    b_G = tl.dot(b_k, tl.trans(b_k))
    b_dbeta += tl.sum(b_dA * b_G, axis=1)
    b_E = b_dA * b_beta[:, None]  # the gradient of the Gram matrix k k^T
    b_Y = b_E * b_G  # = dA * A
    b_dgc += tl.sum(b_Y, axis=1) - tl.sum(b_Y, axis=0)
    b_E += _transpose_via_scratch(b_E, scratch + (i_c.to(tl.int64) * HV + i_hv) * 4096)
    at_k = (tok * HV + i_hv)[:, None] * K + rk[None, :]
    b_dk += tl.dot(b_E.to(DT), b_k) + tl.load(dk + at_k, mask=km, other=0.0).to(tl.float32)
    tl.store(dk + at_k, b_dk.to(dk.dtype.element_ty), mask=km)
    b_dgc += tl.load(dgc + tok * HV + i_hv, mask=valid, other=0.0)
    # g_t enters every gc_i with i >= t
    tl.store(dg + tok * HV + i_hv, tl.sum(b_dgc, axis=0) - tl.cumsum(b_dgc, axis=0) + b_dgc, mask=valid)
    tl.store(dbeta + tok * HV + i_hv, b_dbeta, mask=valid)


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _grads_qk_kernel(q, k, gc, h, dh, vn, do, dq, dk, dgc, chunks, seq_end, scale,
                     H, HV, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """_grads_qk_chunk, one program per (chunk, value head)."""
    _grads_qk_chunk(q, k, gc, h, dh, vn, do, dq, dk, dgc, chunks, seq_end, scale, tl.program_id(0), tl.program_id(1),
                    H, HV, K, V, BK, BV, NV)


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _grads_wy_kernel(k, v, gc, beta, A_inv, h, dvn, dk, dv, dbeta, dgc, dg, scratch, chunks, seq_end,
                     H, HV, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """_grads_wy_chunk, one program per (chunk, value head), after _grads_qk_kernel."""
    _grads_wy_chunk(k, v, gc, beta, A_inv, h, dvn, dk, dv, dbeta, dgc, dg, scratch, chunks, seq_end,
                    tl.program_id(0), tl.program_id(1), H, HV, K, V, BK, BV, NV)


# The fused kernel calls the two halves as functions (noinline): inlined into one body, the compiler kept the first
# half's shared-memory descriptors live across the second half's V loop (255 registers and 96 B of spills in an
# sm_90 compile at K = V = 128, 64 columns, 8 warps); called, each half allocates its own (235 registers, none).
_grads_qk_call = triton.jit(noinline=True)(_grads_qk_chunk.fn)
_grads_wy_call = triton.jit(noinline=True)(_grads_wy_chunk.fn)


@triton.jit(do_not_specialize=["H", "HV"])  # one compile for every head count
def _grads_kernel(q, k, v, gc, beta, A_inv, h, dh, vn, dvn, do, dq, dk, dv, dbeta, dgc, dg, scratch, chunks, seq_end,
                  scale, H, HV, K: tl.constexpr, V: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """Both halves in one program per (chunk, value head) (FUSED_GRADS): the second half re-reads h, k and the
    partial dk and dgc that the first half wrote a few microseconds earlier, from L2, where the split kernels read
    them from HBM (about 1.1-1.3 GB at 65k tokens and 16 heads of 128)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    _grads_qk_call(q, k, gc, h, dh, vn, do, dq, dk, dgc, chunks, seq_end, scale, i_c, i_hv, H, HV, K, V, BK, BV, NV)
    tl.debug_barrier()  # the partial dk and dgc were stored by other threads of this program
    _grads_wy_call(k, v, gc, beta, A_inv, h, dvn, dk, dv, dbeta, dgc, dg, scratch, chunks, seq_end, i_c, i_hv,
                    H, HV, K, V, BK, BV, NV)


# ----------------------------------------------------------------------------------------------------------------
# host side


@dataclasses.dataclass
class Layout:
    """Chunk and segment tables of one call, on the device.

    chunks [NC, 3] (sequence, first flat token, chunk index in its sequence) and seq_end [N] address chunks;
    segs [S, 6] (sequence, first chunk row, chunk count, first token, sequence start, sequence end) and
    seq_segs [N, 2] (first segment, segment count) address segments. Every sequence has at least one segment
    (an empty document has one of zero chunks, so its final state is its initial state).
    """

    chunks: torch.Tensor
    seq_end: torch.Tensor
    segs: torch.Tensor
    seq_segs: torch.Tensor
    num_seqs: int
    num_chunks: int
    num_segs: int

    @property
    def segmented(self) -> bool:
        return self.num_segs > self.num_seqs


def auto_segment_chunks(longest_chunks: int, programs_per_segment: int, device: torch.device) -> int:
    """Chunks per segment: the smallest power of two L with L^2 >= 2 chunks (64 at 65k tokens), unless the
    unsegmented pass already has enough programs to fill the GPU (or no GPU: the interpreter gains nothing). The
    folds' depth is chunks / L steps, each dearer than a scan step, while the scans cost about the same at any L
    as long as their programs fill the GPU: at 65k tokens on an H100, segments of 8, 16, 32, 64 chunks gave fwd+bwd
    17.9 / 16.7 / 16.0 ms (v1) and 11.86 / 11.20 / 11.10 ms (v5, folds 0.93 / 0.47 / 0.22 ms; NOTES.md). The
    environment variable LCTRAIN_GDN_SEGMENT_CHUNKS overrides it (for benchmarks)."""
    override = os.environ.get("LCTRAIN_GDN_SEGMENT_CHUNKS")
    if override:
        return max(1, int(override))
    if device.type != "cuda" or longest_chunks <= 4:
        return max(1, longest_chunks)
    if programs_per_segment >= 4 * torch.cuda.get_device_properties(device).multi_processor_count:
        return longest_chunks
    return 1 << ((2 * longest_chunks - 1).bit_length() + 1) // 2


def build_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device,
                 segment_chunks: int | None, programs_per_segment: int) -> Layout:
    """The tables of one call. Equal-length rows reuse a cached layout; packed documents need their offsets on the
    host (one synchronisation when they live on the GPU, as the grid sizes depend on them)."""
    if cu_seqlens is None:
        L = segment_chunks or auto_segment_chunks(-(-T // CHUNK), B * programs_per_segment, device)
        return _equal_rows_layout(B, T, device, L)
    offsets = host_offsets(cu_seqlens)
    nc = (offsets[1:] - offsets[:-1] + CHUNK - 1) // CHUNK
    L = segment_chunks or auto_segment_chunks(int(nc.max()), nc.numel() * programs_per_segment, device)
    return _tables(B, T, offsets, device, L)


@functools.lru_cache(maxsize=64)
def _equal_rows_layout(B: int, T: int, device: torch.device, L: int) -> Layout:
    return _tables(B, T, None, device, L)


def _tables(B: int, T: int, offsets: torch.Tensor | None, device: torch.device, L: int) -> Layout:
    if offsets is None:
        starts = torch.arange(B, dtype=torch.int64) * T
        ends = starts + T
    else:
        starts, ends = offsets[:-1], offsets[1:]
    N = starts.numel()
    chunks = chunk_map(offsets, B, T, CHUNK).to(torch.int64)
    nc = (ends - starts + CHUNK - 1) // CHUNK
    first_chunk = torch.cumsum(nc, 0) - nc
    ns = torch.clamp((nc + L - 1) // L, min=1)
    first_seg = torch.cumsum(ns, 0) - ns
    seg_seq = torch.repeat_interleave(torch.arange(N), ns)
    seg_index = torch.arange(seg_seq.numel()) - first_seg[seg_seq]
    segs = torch.stack([seg_seq, first_chunk[seg_seq] + seg_index * L,
                        torch.clamp(nc[seg_seq] - seg_index * L, max=L), starts[seg_seq] + seg_index * L * CHUNK,
                        starts[seg_seq], ends[seg_seq]], dim=1)
    seq_segs = torch.stack([first_seg, ns], dim=1)
    tables = device_table(torch.cat([chunks.flatten(), ends, segs.flatten(), seq_segs.flatten()]), device)
    a, b, c = chunks.numel(), N, segs.numel()
    return Layout(tables[:a].view(-1, 3), tables[a:a + b], tables[a + b:a + b + c].view(-1, 6),
                  tables[a + b + c:].view(-1, 2), N, chunks.shape[0], segs.shape[0])


# The smallest K or V tile. 16-wide tiles as a product's inner or outer dimension were miscompiled on an H100
# (Triton 3.6): with K = 16 the gradient kernel read shared memory out of bounds in float32 (compute-sanitizer)
# and the bf16 forward returned NaN; masked 32-wide tiles cost nothing at the head sizes models use.
MIN_TILE = 32


def _pow2(n: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(n))


# Per kernel role: (columns per program, warps, pipeline stages) for K = V = 128 on sm_90, chosen from compiles for
# sm_90 without a GPU (registers, spills, programs per SM: benchmarks/NOTES.md) and GPU timings. State column
# blocks shrink for wider keys so that a program's K x columns float32 tile stays at 128 x 64 at most.
TUNING = {
    "prepare": (64, 4, 1),  # _wy_prepare_kernel (columns of u)
    "summary": (32, 4, 3),  # _fwd_scan_kernel, SUMMARY
    "states": (32, 4, 3),  # _fwd_scan_kernel, writing h and vn
    "output": (64, 4, 1),  # _output_kernel
    "combine": (32, 4, 1),  # _combine_kernel (64 programs at 16 heads of 128: 0.33 ms for the two folds, was 0.47)
    "local_dvn": (128, 8, 1),  # _local_dvn_kernel (q k^T once per chunk: 0.48 ms, was 0.61 at 64 columns)
    "grad_summary": (32, 4, 2),  # _bwd_scan_kernel, SUMMARY
    "grad_scan": (32, 4, 2),  # _bwd_scan_kernel, writing dh and dvn
    "grads": (64, 8, 2),  # _grads_qk_kernel and _grads_wy_kernel (V loop step)
    "grads_fused": (64, 8, 2),  # _grads_kernel (V loop step), when FUSED_GRADS
}
# One launch for the input gradients (_grads_kernel: both halves per program, the second re-reading h, k and the
# partial dk from L2) instead of _grads_qk_kernel then _grads_wy_kernel. Off until measured on a GPU
# (benchmarks/NOTES.md, v7 candidate).
FUSED_GRADS = False
# Keep the forward's w, T, vn, gc (K + 64 + V + 1 values per token and value head) and h (K x V per chunk) for the
# backward: ~1.2 GB per layer at 65k tokens and 16 heads of 128, in bf16. Recomputing them instead (False) costs a
# UT transform and a state scan in the backward (~0.8 + ~0.9 ms at that size on an H100, benchmarks/NOTES.md).
KEEP_FORWARD_STATES = True


def _tuned(role: str, K: int, V: int) -> tuple[int, int, int]:
    columns, warps, stages = TUNING[role]
    columns = max(MIN_TILE, min(columns, triton.next_power_of_2(V), columns * 128 // _pow2(K)))
    return columns, warps, stages


def _configs(warps: int, stages: int) -> list[tuple[int, int]]:
    """The tuned (warps, stages), then fallbacks with fewer stages for GPUs with less shared memory."""
    return [(warps, s) for s in range(stages, 0, -1)] + ([(4, 1)] if warps != 4 else [])


_CONFIGS: dict = {}


def _launch(kernel, grid, configs, *args, **constexprs):
    """Launch with the first (num_warps, num_stages) that fits the GPU's resources, remembered per shape."""
    key = (kernel, args[0].dtype, tuple(sorted(constexprs.items())), tuple(configs))
    if key in _CONFIGS:
        num_warps, num_stages = _CONFIGS[key]
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    error = None
    for num_warps, num_stages in configs:
        try:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        except OutOfResources as e:
            error = e
            continue
        _CONFIGS[key] = (num_warps, num_stages)
        return
    raise error


def wy_prepare(k, v, g, beta, layout: Layout):
    """gc (float32 [B, T, HV]), T = (I + A)^-1 ([B, T, HV, 64]), w ([B, T, HV, K]), u ([B, T, HV, V])."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    gc = new_output((B, T, HV), torch.float32, k.device)
    Y = new_output((B, T, HV, 16), torch.float32, k.device)
    A_inv = new_output((B, T, HV, CHUNK), k.dtype, k.device)
    w = new_output((B, T, HV, K), k.dtype, k.device)
    u = new_output((B, T, HV, V), k.dtype, k.device)
    BK = _pow2(K)
    BV, warps, stages = _tuned("prepare", K, V)
    precision = "tf32x3" if k.dtype == torch.float32 else "tf32"
    _launch(_diag_block_inverse_kernel, (layout.num_chunks * 4, HV), _configs(1, 1),
            k, g, beta, Y, layout.chunks, layout.seq_end, H, HV, K=K, BK=BK, PRECISION=precision)
    _launch(_wy_prepare_kernel, (layout.num_chunks, HV), _configs(warps if BK <= 128 else 8, stages),
            k, v, g, beta, Y, gc, A_inv, w, u, layout.chunks, layout.seq_end, H, HV,
            K=K, V=V, BK=BK, BV=BV, NV=triton.cdiv(V, BV), PRECISION=precision)
    return gc, A_inv, w, u


def forward_summary(k, w, u, gc, layout: Layout):
    """[M | E] of every segment: float32 [S, HV, K, K + V]."""
    B, T, H, K = k.shape
    HV, V = u.shape[2], u.shape[3]
    BV, warps, stages = _tuned("summary", K, V)
    nbm = triton.cdiv(K, BV)
    nb = nbm + triton.cdiv(V, BV)
    summary = new_output((layout.num_segs, HV, K, K + V), torch.float32, k.device)
    _launch(_fwd_scan_kernel, (layout.num_segs * nb, HV), _configs(warps, stages),
            k, w, u, gc, u, u, summary, summary, summary, layout.segs, H, HV,
            K=K, V=V, BK=_pow2(K), BV=BV, NB=nb, NBM=nbm, SUMMARY=True, HAS_INIT=False, STORE_FINAL=False)
    return summary


def combine(summary, affine, init, layout: Layout, K: int, V: int, reverse: bool):
    """Each segment's entering state (forward) or leaving-state gradient (reverse), float32 [S, HV, K, V]."""
    HV = summary.shape[1]
    BK = _pow2(K)
    BV, warps, stages = _tuned("combine", K, V)
    seg_state = new_output((layout.num_segs, HV, K, V), torch.float32, summary.device)
    stride = affine.shape[-1]
    if not reverse:
        affine = affine[..., K:]  # E: the columns after M
    _launch(_combine_kernel, (layout.num_seqs, HV, triton.cdiv(V, BV)), _configs(warps, stages),
            summary, affine, stride, init if init is not None else summary, seg_state, layout.seq_segs, HV,
            K=K, V=V, BK=BK, BV=BV, KB=min(BK, 64), REVERSE=reverse, HAS_INIT=init is not None)
    return seg_state


def state_scan(k, w, u, gc, seg_init, layout: Layout, output_final_state: bool):
    """Every chunk's entering state h [NC, HV, K, V] and pseudo-values vn [B, T, HV, V] (input dtype), and the
    final states [N, HV, K, V] (float32) if asked."""
    B, T, H, K = k.shape
    HV, V = u.shape[2], u.shape[3]
    BV, warps, stages = _tuned("states", K, V)
    h = new_output((layout.num_chunks, HV, K, V), k.dtype, k.device)
    vn = new_output((B, T, HV, V), k.dtype, k.device)
    final = new_output((layout.num_seqs, HV, K, V), torch.float32, k.device) if output_final_state else None
    nb = triton.cdiv(V, BV)
    _launch(_fwd_scan_kernel, (layout.num_segs * nb, HV), _configs(warps, stages),
            k, w, u, gc, h, vn, seg_init if seg_init is not None else gc, gc, final if final is not None else gc,
            layout.segs, H, HV, K=K, V=V, BK=_pow2(K), BV=BV, NB=nb, NBM=0, SUMMARY=False,
            HAS_INIT=seg_init is not None, STORE_FINAL=final is not None)
    return h, vn, final


def _per_chunk_grid(role, layout: Layout, HV: int, K: int, V: int):
    BV, warps, stages = _tuned(role, K, V)
    return (layout.num_chunks, triton.cdiv(V, BV), HV), BV, _configs(warps, stages)


def output(q, k, gc, h, vn, layout: Layout, scale: float, out_dtype):
    """o [B, T, HV, V] from every chunk's entering state h and pseudo-values vn."""
    B, T, H, K = q.shape
    HV, V = vn.shape[2], vn.shape[3]
    o = new_output((B, T, HV, V), out_dtype, q.device)
    grid, BV, configs = _per_chunk_grid("output", layout, HV, K, V)
    _launch(_output_kernel, grid, configs, q, k, gc, h, vn, o, layout.chunks, layout.seq_end, scale, H, HV,
            K=K, V=V, BK=_pow2(K), BV=BV)
    return o


def local_dvn(q, k, gc, do, layout: Layout, scale: float):
    """scale P^T do [B, T, HV, V] (input dtype): each chunk's own part of the pseudo-values' gradient."""
    B, T, H, K = q.shape
    HV, V = do.shape[2], do.shape[3]
    dvl = new_output((B, T, HV, V), k.dtype, q.device)
    grid, BV, configs = _per_chunk_grid("local_dvn", layout, HV, K, V)
    _launch(_local_dvn_kernel, grid, configs, q, k, gc, do, dvl, layout.chunks, layout.seq_end, scale, H, HV,
            K=K, V=V, BK=_pow2(K), BV=BV)
    return dvl


def backward_scan(q, k, w, gc, do, dvl, seg_dinit, layout: Layout, scale: float, summary: bool, want_dh0: bool):
    """SUMMARY: G of every segment (float32 [S, HV, K, V]); otherwise dh [NC, HV, K, V], dvn [B, T, HV, V] and
    dh0 [N, HV, K, V] (or None)."""
    B, T, H, K = k.shape
    HV, V = do.shape[2], do.shape[3]
    BV, warps, stages = _tuned("grad_summary" if summary else "grad_scan", K, V)
    dummy = gc
    gsum = new_output((layout.num_segs, HV, K, V), torch.float32, k.device) if summary else None
    dh = None if summary else new_output((layout.num_chunks, HV, K, V), k.dtype, k.device)
    dvn = None if summary else new_output(do.shape, k.dtype, k.device)
    dh0 = new_output((layout.num_seqs, HV, K, V), torch.float32, k.device) if want_dh0 and not summary else None
    nb = triton.cdiv(V, BV)
    _launch(_bwd_scan_kernel, (layout.num_segs * nb, HV), _configs(warps, stages),
            q, k, w, gc, do, dvl, dh if dh is not None else dummy, dvn if dvn is not None else dummy,
            seg_dinit if seg_dinit is not None else dummy, gsum if summary else dummy,
            dh0 if dh0 is not None else dummy, layout.segs, scale, H, HV,
            K=K, V=V, BK=_pow2(K), BV=BV, NB=nb, SUMMARY=summary, STORE_DH=not summary,
            HAS_INIT=seg_dinit is not None, STORE_DH0=dh0 is not None)
    return gsum if summary else (dh, dvn, dh0)


def forward_states(k, v, g, beta, initial_state, output_final_state, layout: Layout):
    """Everything the outputs and the backward need: (gc, T, w, h, vn), the final states, each segment's entering
    state and the forward summary (None when no sequence has several segments)."""
    K, V = k.shape[-1], v.shape[-1]
    gc, A_inv, w, u = wy_prepare(k, v, g, beta, layout)
    summary = None
    seg_init = initial_state
    if layout.segmented:
        summary = forward_summary(k, w, u, gc, layout)
        seg_init = combine(summary, summary, initial_state, layout, K, V, reverse=False)
    h, vn, final = state_scan(k, w, u, gc, seg_init, layout, output_final_state)
    return (gc, A_inv, w, h, vn), final, seg_init, summary


def chunk_backward(q, k, v, g, beta, scale, kept, seg_init, summary, do, dht, layout: Layout, want_dh0: bool):
    """dq, dk [B, T, H, K], dv, dbeta, dg, dh0; ``kept`` is forward_states' (gc, T, w, h, vn), or None to recompute
    it from each segment's entering state."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if kept is None:
        gc, A_inv, w, u = wy_prepare(k, v, g, beta, layout)
        h, vn, _ = state_scan(k, w, u, gc, seg_init, layout, False)
        del u
    else:
        gc, A_inv, w, h, vn = kept
    dvl = local_dvn(q, k, gc, do, layout, scale)
    seg_dinit = dht
    if layout.segmented:
        gsum = backward_scan(q, k, w, gc, do, dvl, None, layout, scale, summary=True, want_dh0=False)
        seg_dinit = combine(summary, gsum, dht, layout, K, V, reverse=True)
    dh, dvn, dh0 = backward_scan(q, k, w, gc, do, dvl, seg_dinit, layout, scale, summary=False, want_dh0=want_dh0)
    del dvl
    grouped = HV != H
    qk_grad_dtype = torch.float32 if grouped else q.dtype
    dq = new_output((B, T, HV, K), qk_grad_dtype, q.device)
    dk = new_output((B, T, HV, K), qk_grad_dtype, q.device)
    dv = new_output((B, T, HV, V), v.dtype, q.device)
    dbeta = new_output((B, T, HV), torch.float32, q.device)
    dg = new_output((B, T, HV), torch.float32, q.device)
    dgc = new_output((B, T, HV), torch.float32, q.device)
    scratch = torch.empty(layout.num_chunks * HV * CHUNK * CHUNK, dtype=torch.float32, device=q.device)
    BV, warps, stages = _tuned("grads_fused" if FUSED_GRADS else "grads", K, V)
    sizes = dict(K=K, V=V, BK=_pow2(K), BV=BV, NV=triton.cdiv(V, BV))
    if FUSED_GRADS:
        _launch(_grads_kernel, (layout.num_chunks, HV), _configs(warps, stages),
                q, k, v, gc, beta, A_inv, h, dh, vn, dvn, do, dq, dk, dv, dbeta, dgc, dg, scratch, layout.chunks,
                layout.seq_end, scale, H, HV, **sizes)
    else:
        _launch(_grads_qk_kernel, (layout.num_chunks, HV), _configs(warps, stages),
                q, k, gc, h, dh, vn, do, dq, dk, dgc, layout.chunks, layout.seq_end, scale, H, HV, **sizes)
        _launch(_grads_wy_kernel, (layout.num_chunks, HV), _configs(warps, stages),
                k, v, gc, beta, A_inv, h, dvn, dk, dv, dbeta, dgc, dg, scratch, layout.chunks, layout.seq_end, H, HV,
                **sizes)
    if grouped:
        dq = dq.view(B, T, H, HV // H, K).sum(3).to(q.dtype)
        dk = dk.view(B, T, H, HV // H, K).sum(3).to(k.dtype)
    return dq, dk, dv, dbeta, dg, dh0


class ChunkGatedDeltaRule(torch.autograd.Function):
    """Triton path of ``chunk_gated_delta_rule``; g, beta and the initial state arrive as float32."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, segment_chunks):
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        programs = HV * triton.cdiv(V, _tuned("states", K, V)[0])  # per segment, in the state scan
        layout = build_layout(B, T, cu_seqlens, q.device, segment_chunks, programs)
        kept, final, seg_init, summary = forward_states(k, v, g, beta, initial_state, output_final_state, layout)
        gc, _, _, h, vn = kept
        o = output(q, k, gc, h, vn, layout, scale, v.dtype)
        ctx.keep = KEEP_FORWARD_STATES
        ctx.save_for_backward(q, k, v, g, beta, seg_init, summary, *(kept if ctx.keep else ()))
        ctx.layout, ctx.scale, ctx.has_initial_state = layout, scale, initial_state is not None
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, seg_init, summary, *kept = ctx.saved_tensors
        dq, dk, dv, dbeta, dg, dh0 = chunk_backward(
            q, k, v, g, beta, ctx.scale, kept if ctx.keep else None, seg_init, summary, do.contiguous(),
            None if dht is None else dht.contiguous(), ctx.layout, want_dh0=ctx.has_initial_state)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None


def chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  segment_chunks: int | None = None):
    """The Triton path with its inputs made contiguous and float32 where the kernels need it.

    ``segment_chunks`` (chunks per parallel segment) defaults to a heuristic; tests set it small to exercise the
    segment summaries and their composition.
    """
    g32, beta32 = g.float().contiguous(), beta.float().contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return ChunkGatedDeltaRule.apply(q.contiguous(), k.contiguous(), v.contiguous(), g32, beta32, scale, h0,
                                     output_final_state, cu_seqlens, segment_chunks)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over whole sequences (training and prefill): S_t = exp(g_t) (I - beta_t k_t k_t^T)
    S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] with HV a multiple of H (value head h reads key head h // (HV / H)).
        g: [B, T, HV], log decay (float32; any float dtype is cast). beta: [B, T, HV].
        scale: defaults to K ** -0.5.
        initial_state: [N, HV, K, V] (float32), N = B, or the number of documents with ``cu_seqlens``.
        output_final_state: also return the states after each sequence.
        cu_seqlens: int64 [N + 1] offsets of documents packed along one row (B = 1); states reset at each start.
    Returns:
        o [B, T, HV, V] in v's dtype; final_state [N, HV, K, V] float32, or None.
    Gradients reach q, k, v, g, beta and initial_state, and flow back from final_state. K, V <= 256; q, k, v
    float32, bfloat16 or float16. CUDA tensors (or CPU under TRITON_INTERPRET=1) run the Triton kernels; other
    CPU tensors run the torch chunkwise implementation.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton(q):
        return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
