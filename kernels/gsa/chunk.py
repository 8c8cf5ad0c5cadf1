"""Chunkwise gated linear attention in Triton (forward and backward), and GSA as two such passes joined by a softmax.

Gated linear attention, one head, S in R^{K x V}, log gates g_t <= 0 (see reference.py):
    gate on the key side    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T
    gate on the value side  S_t = S_{t-1} diag(exp g_t) + k_t v_t^T
    o_t = scale * S_t^T q_t
GSA's key pass is the value-gated form with (q, k, s) and scale; its value pass the key-gated form with (p, s, v) and
scale 1, p = softmax of the key pass's output over the slots.

Chunks of BT tokens. Within a chunk the gates are cumulated in float32, b_i = g_1 + ... + g_i (``gc``), and every
exponential taken is bounded: exp(b_C - b_j), exp(b_i), and for the intra-chunk term sum_{j<=i} (...) exp(b_i - b_j)
one of two factorisations, chosen per chunk from its gate drop (max over the gated dim of b_first - b_last):
    drop <= GAP_LIMIT (the common case: GSA's damped gates fall by ~5-10 across a chunk): through the reference
        r = b at the chunk's first row, exp(b_i - r) <= 1 and exp(r - b_j) <= e^drop, one masked matrix product;
    otherwise (shut gates, resets): BC-token sub-blocks; across them the same product through the reference of the
        output sub-block's first row, inside them an elementwise sum, one column of every diagonal sub-block at a time.
Each kernel with an intra term is compiled for either case, so that the rare case's registers do not limit the common
case's occupancy: a launch over every chunk does the common ones and appends the others to a device list (an atomic
counter), and a small persistent launch of the sub-block kernel walks that list (at once done when it is empty: no
host synchronisation, and no launch of thousands of programs that each skip).

Kernels (each serves every gate side and direction; REVERSE reads a chunk's rows backwards, which turns the
backward's anti-causal sums into the forward's causal ones):
    _chunk_cumsum_kernel   gc = cumulative gates within chunks
    _state_scan_kernel     states at chunk boundaries, in a sequential loop over a unit of chunks
    _compose_kernel        initial state of every unit from the units' end states (parallel/state_passing.py's algebra)
    output = scale_inter * (gated x) w + scale_intra * (gated intra-chunk scores) z, with the gate on
        x's dim:  _key_gate_scores_kernel (per chunk: the scores and the gated x, in the products' dtype), then
                  _key_gate_output_kernel (per chunk and block of output columns: two products);
        z's dim:  _value_gate_output_kernel (per chunk and block of output columns: one pass over x's dim for
                  x y^T and x w, then the gated intra sum)
    _slot_softmax(_grad)_kernel, _gate_terms_kernel: GSA's softmax between the passes, its backward, and the gate
                           gradient's per-token terms (float32 rows of M slots)
    _gate_grad_kernel      dg from the per-token terms and the chunk-end terms
With one long sequence and few heads the sequential loop would leave most of the GPU idle, so a sequence is cut into
units of UNIT_CHUNKS chunks: a first scan gives every unit's end state from zero and its total decay, a small
sequential pass composes them (S_in(u+1) = exp(L_u) * S_in(u) + E_u, elementwise since the decay is diagonal), and a
second scan from the true S_in(u) writes the boundary states.

The backward of o = out(q, k, v, h) reuses the same kernels (h: forward states, dh: state gradients from a
reverse scan of (q, do)); with s the gate side and s' the other one:
    dq = out(do, v, k, h^T,  s', forward, scale, scale)
    dk = out(v, do, q, dh^T, s', reverse, 1, scale)
    dv = out(k, q, do, dh,   s,  reverse, 1, scale)
and the gate gradient, from d/db_i of the chunk form, is for each chunk
    dg_i = sum_{i' >= i in chunk} x_i' + z_end,   x = q*dq - k*dk (key gate) or o*do - v*dv (value gate),
    z_end = rowsum (key gate) or colsum (value gate) of dh_end * h_end at the chunk's end boundary.
Boundary states are kept in the inputs' dtype (the products' operand type), the carried state and everything
returned as a state in float32. With KEEP_FORWARD_STATES (the default) the forward's boundary states and gc (and
GSA's softmax p) are kept for the backward: per GSA layer (T/64 + 1) * H * (K*M + M*V) states in the inputs' dtype
(bf16 at T = 65536, H = 4, K = V = 512, M = 64: 2 x 268 MB; with gc (float32) 67 MB and p 34 MB, ~0.64 GB) until its
backward; under activation checkpointing only the recompute holds them. chunk_gated_linear_attention keeps
(T/64 + 1) * H * K * V states (Mamba2 at hidden 2048, expand 2, 64 heads of 64, state 64: 537 MB per layer at 65k,
as much as its x) and gc in place of g (the same size with float32 gates). Off, the backward recomputes them with
one scan per pass from the units' initial states (0.83 ms per GSA fwd+bwd at that size on an H100). Both give the
same states bit for bit (same kernel, same inputs), hence the same gradients and error bounds.

Note: no kernel transposes the result of a tl.dot (Triton 3.4-3.7.0 miscompiles that on Hopper; see fla issue #640).
"""
from __future__ import annotations

import collections
import dataclasses

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ..common import check_cu_seqlens, chunk_map, device_table, host_offsets, new_output, use_triton
from .chunk_torch import gla_chunk_torch, gsa_chunk_torch

BT = 64  # chunk length
BC = 8  # sub-block length of the intra-chunk factorisation
# Largest drop of the cumulative gates across a chunk for which its gated intra sum is one matrix product through
# one reference row (factors up to e^60 ~ 1e26: no overflow in float32 or bfloat16 products); chunks with a larger
# drop (strongly shut gates, resets) take the sub-block factorisation.
GAP_LIMIT = 60.0
# Keep the forward's boundary states (and gc, p) for the backward instead of recomputing them (module docstring).
KEEP_FORWARD_STATES = True
# Chunks per sequential unit; None: chosen from the GPU's size (one unit per sequence on CPU).
UNIT_CHUNKS: int | None = None
# Warps per program, from sm_90 compile reports (Triton 3.9; common case): the scores kernel 104-128 registers at 8
# warps, the key-gate output kernel 128-168 at 4, the value-gate output kernel 255 at 8 (at 4 it spills ~0.6 KB per
# thread); the scan 242-255 at 4. The sub-block launches, rare: scores 228-232 registers, value gate 255 with
# ~170 B of spills per thread (the loop over the deferred list keeps more alive than v3's one chunk per program).
SCORES_WARPS = 8
STREAM_WARPS = 4
VALUE_GATE_WARPS = 8
SCAN_WARPS = 4
# Kinds of key-gated scan (GSA's value pass, Mamba2) that carry S^T instead of S: "units" (unit_initial_states),
# "states" (state_scan writing boundary states), "pair" (state_scan with the gate gradient's pair term). Carrying S,
# the product's A operand is (x * w)^T: built in registers, transposed through shared memory and reloaded as a
# register operand, and x is prefetched in registers (sm_90 compile, Triton 3.9, 4 warps: 216-224 registers, two
# programs per SM). Carrying S^T, (x * w) is the B operand (one shared-memory store) and y^T a view of y's pipelined
# shared copy, as in the value-gated scans (136-152 registers, three per SM); the costs: boundary states stored from
# S^T's layout (loop barriers 4 -> 10) and, with "pair", the z term summed across warps (8 -> 28).
# Candidate, off until timed on a GPU (/work/notes/helper_gsa3_notes.md).
KEY_GATE_SCAN_TRANSPOSED: frozenset[str] = frozenset()
_SCAN_KINDS = frozenset({"units", "states", "pair"})

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _block(dim: int, cap: int = 64) -> int:
    return max(16, min(cap, triton.next_power_of_2(dim)))


def _dot_args(dtype: torch.dtype) -> dict:
    """Matrix-product operand type, and IEEE float32 products for float32 inputs (tf32 would cost ~1e-3)."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"Triton GSA kernels take float32, bfloat16 or float16 inputs, got {dtype}")
    return {"DT": _TL_DTYPES[dtype], "PREC": "ieee" if dtype == torch.float32 else "tf32"}


# ---------------------------------------------------------------------------------------------------------------
# Work plan: chunks, boundary slots, units.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """Where every chunk, boundary state and sequential unit lives.

    Sequence n with c_n chunks owns c_n + 1 consecutive boundary slots (its start, after each chunk); chunk i of it
    starts at slot first_slot(n) + i and ends at the next slot.
    chunks: int32 [C, 3] (first token in the flattened [B*T] row, valid rows, start slot)
    units:  int32 [U, 5] (sequence, first chunk, chunks, first slot, flags: 1 first unit of its sequence, 2 last)
    seq_units: int32 [N, 2] (first unit, units) of each sequence
    """

    chunks: torch.Tensor
    units: torch.Tensor
    seq_units: torch.Tensor
    n_seqs: int
    n_slots: int
    split: bool  # some sequence has more than one unit


def _unit_chunks(total_chunks: int, programs_per_unit: int, device: torch.device) -> int | None:
    if UNIT_CHUNKS is not None:
        return UNIT_CHUNKS
    if device.type != "cuda":
        return None
    # Enough scan programs to fill the GPU several times over; below 8 chunks a unit costs more than it saves.
    units = triton.cdiv(8 * _sm_count(device), programs_per_unit)
    return max(8, triton.cdiv(total_chunks, units))


# Plans already built: building one costs ~0.4 ms of host time (a few dozen small torch operations and three
# host-to-device copies) during which the GPU may idle, and every layer of a step asks for the same one.
_PLANS: collections.OrderedDict = collections.OrderedDict()  # (batch, length, *settings) -> Plan, without cu_seqlens
_VARLEN_PLANS = WeakIdKeyDictionary()  # cu_seqlens -> ((its version, *settings), Plan)
_MAX_PLANS = 64


def make_plan(cu_seqlens: torch.Tensor | None, batch: int, length: int, device: torch.device,
              programs_per_unit: int) -> Plan:
    """The plan for these inputs, built once per shape (or per cu_seqlens tensor and version) and setting."""
    settings = (torch.device(device), programs_per_unit, UNIT_CHUNKS)
    if cu_seqlens is not None:
        key = (cu_seqlens._version, *settings)
        entry = _VARLEN_PLANS.get(cu_seqlens)
        if entry is None or entry[0] != key:
            entry = (key, _build_plan(cu_seqlens, batch, length, device, programs_per_unit))
            _VARLEN_PLANS[cu_seqlens] = entry
        return entry[1]
    key = (batch, length, *settings)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _build_plan(None, batch, length, device, programs_per_unit)
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    return plan


def _build_plan(cu_seqlens: torch.Tensor | None, batch: int, length: int, device: torch.device,
                programs_per_unit: int) -> Plan:
    offsets = None if cu_seqlens is None else host_offsets(cu_seqlens)
    if offsets is None:
        starts = torch.arange(batch, dtype=torch.int64) * length
        lengths = torch.full((batch,), length, dtype=torch.int64)
    else:
        starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
    n_seqs = starts.numel()
    per_seq = (lengths + BT - 1) // BT
    slots_before = torch.cumsum(per_seq + 1, 0) - (per_seq + 1)
    rows = chunk_map(offsets, batch, length, BT).to(torch.int64)  # (sequence, first token, index)
    seq, first_token, index = rows.unbind(1)
    valid = torch.clamp(lengths[seq] - index * BT, max=BT)
    chunks = torch.stack([first_token, valid, slots_before[seq] + index], dim=1)

    total = int(per_seq.sum())
    longest = int(per_seq.max()) if n_seqs else 0
    unit_len = _unit_chunks(total, programs_per_unit, device)
    if unit_len is None or unit_len >= longest:
        unit_len = max(longest, 1)
    units_per_seq = torch.clamp((per_seq + unit_len - 1) // unit_len, min=1)  # an empty sequence keeps one unit
    unit_seq = torch.repeat_interleave(torch.arange(n_seqs), units_per_seq)
    units_before = torch.cumsum(units_per_seq, 0) - units_per_seq
    j = torch.arange(unit_seq.numel()) - units_before[unit_seq]
    chunks_before = torch.cumsum(per_seq, 0) - per_seq
    count = torch.clamp(per_seq[unit_seq] - j * unit_len, min=0, max=unit_len)
    flags = (j == 0).long() + 2 * (j == units_per_seq[unit_seq] - 1).long()
    units = torch.stack([unit_seq, chunks_before[unit_seq] + j * unit_len, count,
                         slots_before[unit_seq] + j * unit_len, flags], dim=1)
    seq_units = torch.stack([units_before, units_per_seq], dim=1)

    return Plan(device_table(chunks, device), device_table(units, device), device_table(seq_units, device), n_seqs,
                int((per_seq + 1).sum()), bool((units_per_seq > 1).any()))


# ---------------------------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_cumsum_kernel(g, gc, chunks, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_c, i_h, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunks + i_c * 3).to(tl.int64)
    n = tl.load(chunks + i_c * 3 + 1)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    mask = (rows < n)[:, None] & (cols < D)[None, :]
    offs = ((t0 + rows)[:, None] * H + i_h) * D + cols[None, :]
    x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gc + offs, tl.cumsum(x, axis=0), mask=mask)


@triton.jit
def _gate_grad_kernel(x, z, dg, chunks, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dg_i = sum_{i' >= i in chunk} x_i' + z[end slot]: the chunk-end term reaches every token of the chunk."""
    i_c, i_h, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunks + i_c * 3).to(tl.int64)
    n = tl.load(chunks + i_c * 3 + 1)
    end_slot = tl.load(chunks + i_c * 3 + 2).to(tl.int64) + 1
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    mask = (rows < n)[:, None] & (cols < D)[None, :]
    offs = ((t0 + rows)[:, None] * H + i_h) * D + cols[None, :]
    terms = tl.load(x + offs, mask=mask, other=0.0)
    suffix = tl.sum(terms, axis=0)[None, :] - tl.cumsum(terms, axis=0) + terms
    z_end = tl.load(z + (end_slot * H + i_h) * D + cols, mask=cols < D, other=0.0)
    tl.store(dg + offs, (suffix + z_end[None, :]).to(dg.dtype.element_ty), mask=mask)


@triton.jit
def _diagonal_partner(rows, j, n, H: tl.constexpr, REVERSE: tl.constexpr):
    """Column j of each row's diagonal sub-block: (j, whether it is causal and inside the sequence, its token's row
    offset in [T, H, .] tensors; the sequence runs backwards under REVERSE)."""
    j_ok = (j <= rows) & (j < n)
    if REVERSE:
        tok_j = tl.where(j_ok, n - 1 - j, 0) * H
    else:
        tok_j = tl.where(j_ok, j, 0) * H
    return j, j_ok, tok_j


@triton.jit
def _load_rows(ptr, rel, cols, row_ok, D: tl.constexpr):
    """[rows, cols] tile of a [*, H, D] tensor: ptr points at one (token, head) row, rel are int32 row offsets from it
    in (token, head) rows (keeping the per-element address arithmetic 32-bit); zero where masked."""
    return tl.load(ptr + rel[:, None] * D + cols[None, :], mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _load_gates(gc, rel, cols, row_ok, last_rel, D: tl.constexpr, REVERSE: tl.constexpr):
    """Cumulative gates in reading order: b forwards, b_C - b backwards (both fall along the rows)."""
    G = _load_rows(gc, rel, cols, row_ok, D)
    if REVERSE:
        G = tl.load(gc + last_rel * D + cols, mask=cols < D, other=0.0)[None, :] - G
    return G


@triton.jit
def _store_boundary(S, states, pair, pair_sum, slot, i_h, i_k, i_v, rk, rv, state_offs, state_mask, n_slots,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GATE_KEY: tl.constexpr,
                    TRANSPOSED: tl.constexpr, HAS_PAIR: tl.constexpr):
    """Write the boundary state (S, or S^T with TRANSPOSED; state_offs/mask address it in the [K, V] layout); with a
    pair state P (the forward states, in the backward) also the partial rowsum (key gate) or colsum (value gate) of
    S * P over this program's block: the gate gradient's z term."""
    offs = (slot * H + i_h) * K * V + state_offs
    tl.store(states + offs, S.to(states.dtype.element_ty), mask=state_mask)
    if HAS_PAIR:
        P = tl.load(pair + offs, mask=state_mask, other=0.0).to(tl.float32)
        if GATE_KEY:
            tl.store(pair_sum + ((i_v * n_slots + slot) * H + i_h) * K + rk,
                     tl.sum(S * P, axis=0 if TRANSPOSED else 1), mask=rk < K)
        else:
            tl.store(pair_sum + ((i_k * n_slots + slot) * H + i_h) * V + rv, tl.sum(S * P, axis=0), mask=rv < V)


@triton.jit(do_not_specialize=["n_slots"])
def _state_scan_kernel(x, y, gc, init, states, end_state, log_decay, pair, pair_sum, chunks, units, scale, n_slots,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, GATE_KEY: tl.constexpr,
                       REVERSE: tl.constexpr, TRANSPOSED: tl.constexpr,
                       HAS_INIT: tl.constexpr, STORE: tl.constexpr, PER_UNIT: tl.constexpr,
                       HAS_PAIR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Sequential loop over one unit's chunks for one [BK, BV] block of the state (carried as S^T, [BV, BK], with
    TRANSPOSED: key gate only; states in memory keep the [K, V] layout).

    Forward (x = k, y = v):  S <- exp(b_C) * S + sum_i (x_i * exp(b_C - b_i)) y_i^T    (gate on the rows)
    Reverse (x = q, y = do): S <- exp(b_C) * S + scale * sum_i (x_i * exp(b_i)) y_i^T, from the chunk end backwards:
    the state gradient. With the gate on the value side the weights and the decay act on the columns instead.
    STORE writes S at every boundary the loop passes (chunk starts forward, chunk ends in reverse) and, for the
    unit that ends its sequence, after the loop. PER_UNIT writes the unit's end state and total log decay (the first
    scan of a split sequence); otherwise the end state is written per sequence.
    """
    i_k, i_v, i_uh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_u, i_h = i_uh // H, i_uh % H
    seq = tl.load(units + i_u * 5).to(tl.int64)
    first_chunk = tl.load(units + i_u * 5 + 1)
    n_chunks = tl.load(units + i_u * 5 + 2)
    first_slot = tl.load(units + i_u * 5 + 3).to(tl.int64)
    flags = tl.load(units + i_u * 5 + 4)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    rows = tl.arange(0, BT)
    if TRANSPOSED:  # S^T, [BV, BK]
        state_offs = rk[None, :] * V + rv[:, None]
        state_mask = (rk < K)[None, :] & (rv < V)[:, None]
    else:
        state_offs = rk[:, None] * V + rv[None, :]
        state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    if GATE_KEY:  # D = K, BD = BK
        rg = rk
        other_block = i_v
    else:  # D = V, BD = BV
        rg = rv
        other_block = i_k
    if HAS_INIT:
        S = tl.load(init + (i_u * H + i_h) * K * V + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BV, BK] if TRANSPOSED else [BK, BV], dtype=tl.float32)
    total = tl.zeros([BD], dtype=tl.float32)
    for i in range(n_chunks):
        if REVERSE:
            local = n_chunks - 1 - i
            slot = first_slot + local + 1  # the chunk's end
        else:
            local = i
            slot = first_slot + local  # the chunk's start
        c = first_chunk + local
        head0 = tl.load(chunks + c * 3).to(tl.int64) * H + i_h  # (first token, head) of the chunk
        n = tl.load(chunks + c * 3 + 1)
        if STORE:
            _store_boundary(S, states, pair, pair_sum, slot, i_h, i_k, i_v, rk, rv, state_offs, state_mask,
                            n_slots, H, K, V, GATE_KEY, TRANSPOSED, HAS_PAIR)
        valid = rows < n
        X = _load_rows(x + head0 * K, rows * H, rk, valid, K)
        Y = _load_rows(y + head0 * V, rows * H, rv, valid, V)
        G = _load_rows(gc + head0 * D, rows * H, rg, valid, D)
        last = tl.load(gc + head0 * D + (n - 1) * H * D + rg, mask=rg < D, other=0.0)
        if REVERSE:
            weight = tl.exp(G)  # exp(b_i): from the chunk start to token i
        else:
            weight = tl.exp(last[None, :] - G)  # exp(b_C - b_i): from token i to the chunk end
        if TRANSPOSED:  # S^T <- S^T exp(b_C) + Y^T (X * w): the operand made in registers is B, Y^T a view of Y
            update = tl.dot(tl.trans(Y.to(DT)), (X * weight).to(DT), input_precision=PREC)
            S = S * tl.exp(last)[None, :] + scale * update
        elif GATE_KEY:
            update = tl.dot(tl.trans((X * weight).to(DT)), Y.to(DT), input_precision=PREC)
            S = S * tl.exp(last)[:, None] + scale * update
        else:
            update = tl.dot(tl.trans(X.to(DT)), (Y * weight).to(DT), input_precision=PREC)
            S = S * tl.exp(last)[None, :] + scale * update
        total += last
    if REVERSE:
        ends_sequence = (flags & 1) != 0
        end_slot = first_slot
    else:
        ends_sequence = (flags & 2) != 0
        end_slot = first_slot + n_chunks
    if STORE:
        if ends_sequence:
            _store_boundary(S, states, pair, pair_sum, end_slot, i_h, i_k, i_v, rk, rv, state_offs, state_mask,
                            n_slots, H, K, V, GATE_KEY, TRANSPOSED, HAS_PAIR)
    if PER_UNIT:
        tl.store(end_state + (i_u * H + i_h) * K * V + state_offs, S, mask=state_mask)
        if other_block == 0:
            tl.store(log_decay + (i_u * H + i_h) * D + rg, total, mask=rg < D)
    elif ends_sequence:
        tl.store(end_state + (seq * H + i_h) * K * V + state_offs, S, mask=state_mask)


@triton.jit
def _compose_kernel(unit_end, log_decay, init, unit_init, seq_units, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, GATE_KEY: tl.constexpr,
                    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """S_in(first unit) = the sequence's initial state; S_in(next) = exp(L_u) * S_in(u) + E_u, in scan order."""
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first_unit = tl.load(seq_units + i_s * 2)
    n_units = tl.load(seq_units + i_s * 2 + 1)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K * V
    if GATE_KEY:
        gate_idx = offs // V
    else:
        gate_idx = offs % V
    if HAS_INIT:
        S = tl.load(init + (i_s * H + i_h) * K * V + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_units):
        u = (first_unit + (n_units - 1 - i if REVERSE else i)).to(tl.int64)
        tl.store(unit_init + (u * H + i_h) * K * V + offs, S, mask=mask)
        decay = tl.exp(tl.load(log_decay + (u * H + i_h) * D + gate_idx, mask=mask, other=0.0))
        S = decay * S + tl.load(unit_end + (u * H + i_h) * K * V + offs, mask=mask, other=0.0)


@triton.jit
def _chunk_rows(chunks, i_c, i_h, H: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr):
    """(first (token, head) row of the chunk, valid rows, boundary slot of the state it reads, int32 row offsets of
    the reading order: forwards, or backwards with REVERSE, from that first row; masked rows point at it)."""
    head0 = tl.load(chunks + i_c * 3).to(tl.int64) * H + i_h
    n = tl.load(chunks + i_c * 3 + 1)
    slot = tl.load(chunks + i_c * 3 + 2).to(tl.int64)  # the chunk's start: h forwards
    rows = tl.arange(0, BT)
    if REVERSE:
        slot += 1  # the chunk's end: dh backwards
        tok = tl.where(rows < n, n - 1 - rows, 0) * H
    else:
        tok = tl.where(rows < n, rows, 0) * H
    return head0, n, slot, tok


@triton.jit
def _chunk_gate_drop(gc, last_tok, D: tl.constexpr, BD: tl.constexpr):
    """max over the gate's dim of b_first - b_last in the chunk (gc at its first (token, head) row): how far the
    cumulative gates fall across it, in either reading order."""
    drop = 0.0
    for db in range(tl.cdiv(D, BD)):
        rd = db * BD + tl.arange(0, BD)
        first = tl.load(gc + rd, mask=rd < D, other=0.0)
        drop = tl.maximum(drop, tl.max(first - tl.load(gc + last_tok * D + rd, mask=rd < D, other=0.0), axis=0))
    return drop


@triton.jit
def _defer(item, rare, rare_count):
    """Common-case launch, for a chunk whose gate drop exceeds gap_limit: append it (as item) to the device list that
    the sub-block launch walks (in any order: every item writes its own outputs)."""
    tl.store(rare + tl.atomic_add(rare_count, 1), item)


@triton.jit
def _exponent_from_first_row(gc, G, rd, valid, D: tl.constexpr, REVERSE: tl.constexpr):
    """bb - r, r = bb at reading row 0 (<= 0 on valid rows, 0 on masked ones). When the chunk's gate drop is below
    the limit, exp(bb_i - bb_j) = exp(bb_i - r) * exp(r - bb_j) with both factors finite, so the whole chunk's
    gated intra sum is one matrix product. Its operands stay float32 (tf32 products for half inputs): every term,
    the dominant near-diagonal ones included (which the sub-block path sums exactly), goes through the rounded
    factors, and bf16 operands cost Mamba2's decay gradient a 1.1e-2 relative error on an H100 (1e-2 allowed)."""
    if REVERSE:
        r = tl.zeros_like(rd).to(tl.float32)  # bb = b_C - b is 0 at the chunk's last token, reading row 0
    else:
        r = tl.load(gc + rd, mask=rd < D, other=0.0)
    return tl.where(valid[:, None], G - r[None, :], 0.0)


@triton.jit
def _key_gate_scores_kernel(x, y, gc, scores, xg, chunks, rare, rare_count, scale_inter, scale_intra, gap_limit,
                            H: tl.constexpr, KX: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                            SUBBLOCKS: tl.constexpr, REVERSE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Gate on x's dim, one chunk and head (rows i, j in reading order, bb the cumulative gate in that order): the
    intra-chunk scores A_ij = scale_intra * sum_d x_id y_jd exp(bb_id - bb_jd), j <= i, and the gated rows
    xg_i = scale_inter * x_i * exp(bb_i), both in the products' dtype, for _key_gate_output_kernel.

    Off the diagonal sub-blocks the sum factors through the reference r = bb at the first row of the output
    sub-block (exp(bb_i - r) <= 1, exp(r - bb_j) <= 1) into a masked matrix product; on them it is summed
    elementwise, column jj of every sub-block per step (a factorisation there could overflow: bb_j - bb_i is
    unbounded for strong gates).
    Launched per (chunk, head) for the common case, which defers the chunks with larger gate drops to a list;
    with SUBBLOCKS, a few programs walk that list."""
    if SUBBLOCKS:
        for item in range(tl.program_id(0), tl.load(rare_count), tl.num_programs(0)):
            entry = tl.load(rare + item)
            head0, n, _, tok = _chunk_rows(chunks, entry // H, entry % H, H, BT, REVERSE)
            _key_gate_scores(x, y, gc, scores, xg, head0, n, tok, scale_inter, scale_intra, H, KX, BT, BC, BK, True,
                             REVERSE, DT, PREC)
    else:
        i_c, i_h = tl.program_id(0), tl.program_id(1)
        head0, n, _, tok = _chunk_rows(chunks, i_c, i_h, H, BT, REVERSE)
        if _chunk_gate_drop(gc + head0 * KX, (n - 1) * H, KX, BK) > gap_limit:
            _defer(i_c * H + i_h, rare, rare_count)
        else:
            _key_gate_scores(x, y, gc, scores, xg, head0, n, tok, scale_inter, scale_intra, H, KX, BT, BC, BK, False,
                             REVERSE, DT, PREC)


@triton.jit
def _key_gate_scores(x, y, gc, scores, xg, head0, n, tok, scale_inter, scale_intra, H: tl.constexpr,
                     KX: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SUBBLOCKS: tl.constexpr,
                     REVERSE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """_key_gate_scores_kernel's work for one chunk and head (_chunk_rows' head0, n, tok), in one of the two
    factorisations."""
    x += head0 * KX
    y += head0 * KX
    gc += head0 * KX
    xg += head0 * KX
    scores += head0 * BT
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    valid = rows < n
    last_tok = (n - 1) * H
    A = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(tl.cdiv(KX, BK)):
        rk = kb * BK + tl.arange(0, BK)
        X = _load_rows(x, tok, rk, valid, KX).to(tl.float32)
        Y = _load_rows(y, tok, rk, valid, KX).to(tl.float32)
        G = _load_gates(gc, tok, rk, valid, last_tok, KX, REVERSE)
        tl.store(xg + tok[:, None] * KX + rk[None, :], (scale_inter * X * tl.exp(G)).to(DT),
                 mask=valid[:, None] & (rk < KX)[None, :])
        if SUBBLOCKS:
            A = _key_gate_subblocks(A, x, y, gc, X, Y, G, tok, rk, n, last_tok, H, KX, BT, BC, REVERSE, DT, PREC)
        else:
            e = _exponent_from_first_row(gc, G, rk, valid, KX, REVERSE)
            A += tl.dot(X * tl.exp(e), tl.trans(Y * tl.exp(-e)), input_precision=PREC)
    A = tl.where(rows[:, None] >= cols[None, :], A, 0.0)
    tl.store(scores + tok[:, None] * BT + cols[None, :], (scale_intra * A).to(DT), mask=valid[:, None])


@triton.jit
def _key_gate_subblocks(A, x, y, gc, X, Y, G, tok, rk, n, last_tok, H: tl.constexpr, KX: tl.constexpr,
                        BT: tl.constexpr, BC: tl.constexpr, REVERSE: tl.constexpr, DT: tl.constexpr,
                        PREC: tl.constexpr):
    """A + the gated scores of one block of x's dim with unbounded gate drops: through the reference of each
    sub-block off the diagonal sub-blocks, elementwise on them."""
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    block_start = (rows // BC) * BC  # first row of each row's sub-block
    for I in tl.static_range(1, BT // BC):
        in_I = (rows >= I * BC) & (rows < I * BC + BC)
        r = tl.sum(tl.where((rows == I * BC)[:, None], G, 0.0), axis=0)
        xe = X * tl.exp(tl.minimum(G - r[None, :], 0.0))
        ye = Y * tl.exp(tl.minimum(r[None, :] - G, 0.0))
        part = tl.dot(xe.to(DT), tl.trans(ye.to(DT)), input_precision=PREC)
        A += tl.where(in_I[:, None] & (cols < I * BC)[None, :], part, 0.0)
    for jj in range(BC):
        j, j_ok, tok_j = _diagonal_partner(rows, block_start + jj, n, H, REVERSE)
        Yj = _load_rows(y, tok_j, rk, j_ok, KX).to(tl.float32)
        Gj = _load_gates(gc, tok_j, rk, j_ok, last_tok, KX, REVERSE)
        a = tl.sum(X * Yj * tl.exp(tl.minimum(G - Gj, 0.0)), axis=1)
        A += tl.where((cols[None, :] == j[:, None]) & j_ok[:, None], a[:, None], 0.0)
    return A


@triton.jit
def _key_gate_output_kernel(scores, xg, z, w, out, chunks, H: tl.constexpr, KX: tl.constexpr, VZ: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                            REVERSE: tl.constexpr, STRIDE_A: tl.constexpr, STRIDE_B: tl.constexpr,
                            DT: tl.constexpr, PREC: tl.constexpr):
    """Gate on x's dim, one chunk, head and block of BV output columns: out = A z + xg W with A, xg from
    _key_gate_scores_kernel (scales included). w: boundary states, read as W[a, b] = w[slot, head] + a * STRIDE_A +
    b * STRIDE_B (a stored [VZ, KX] state is read transposed). Programs of one chunk are adjacent (its A and xg
    reads after the first come from L2)."""
    i_cv, i_h = tl.program_id(0), tl.program_id(1)
    i_c, i_v = i_cv // NV, i_cv % NV
    head0, n, slot, tok = _chunk_rows(chunks, i_c, i_h, H, BT, REVERSE)
    rows = tl.arange(0, BT)
    valid = rows < n
    rv = i_v * BV + tl.arange(0, BV)
    A = _load_rows(scores + head0 * BT, tok, rows, valid, BT)
    Z = _load_rows(z + head0 * VZ, tok, rv, valid, VZ)
    acc = tl.dot(A, Z.to(DT), input_precision=PREC)
    w_base = w + (slot * H + i_h) * KX * VZ
    for kb in range(tl.cdiv(KX, BK)):
        rk = kb * BK + tl.arange(0, BK)
        Xg = _load_rows(xg + head0 * KX, tok, rk, valid, KX)
        Wt = tl.load(w_base + rk[:, None] * STRIDE_A + rv[None, :] * STRIDE_B,
                     mask=(rk < KX)[:, None] & (rv < VZ)[None, :], other=0.0)
        acc += tl.dot(Xg, Wt.to(DT), input_precision=PREC)
    tl.store(out + head0 * VZ + tok[:, None] * VZ + rv[None, :], acc.to(out.dtype.element_ty),
             mask=valid[:, None] & (rv < VZ)[None, :])


@triton.jit
def _value_gate_output_kernel(x, y, z, gc, w, out, chunks, rare, rare_count, scale_inter, scale_intra, gap_limit,
                              H: tl.constexpr, KX: tl.constexpr, VZ: tl.constexpr, BT: tl.constexpr,
                              BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                              SUBBLOCKS: tl.constexpr, REVERSE: tl.constexpr, STRIDE_A: tl.constexpr,
                              STRIDE_B: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Gate on z's dim, one chunk, head and block of BV output columns (rows in reading order, bb the cumulative
    gate in that order): out_i = scale_inter * (x_i W) * exp(bb_i) + scale_intra * sum_{j <= i} (x_i . y_j) z_j *
    exp(bb_i - bb_j). One pass over x's dim gives both x y^T and x W; the gated intra sum is then factored as in
    _key_gate_scores_kernel, along z's dim. w as in _key_gate_output_kernel. Launched as
    _key_gate_scores_kernel is, per (chunk and column block, head), each column block judged by its own gate drop."""
    if SUBBLOCKS:
        for item in range(tl.program_id(0), tl.load(rare_count), tl.num_programs(0)):
            entry = tl.load(rare + item)
            i_cv, i_h = entry // H, entry % H
            head0, n, slot, tok = _chunk_rows(chunks, i_cv // NV, i_h, H, BT, REVERSE)
            _value_gate_output(x, y, z, gc, w, out, head0, n, slot, tok, i_cv % NV, i_h, scale_inter, scale_intra,
                               H, KX, VZ, BT, BC, BK, BV, True, REVERSE, STRIDE_A, STRIDE_B, DT, PREC)
    else:
        i_cv, i_h = tl.program_id(0), tl.program_id(1)
        head0, n, slot, tok = _chunk_rows(chunks, i_cv // NV, i_h, H, BT, REVERSE)
        rv = (i_cv % NV) * BV + tl.arange(0, BV)
        first = tl.load(gc + head0 * VZ + rv, mask=rv < VZ, other=0.0)
        # of this block's columns: each output column is gated on its own
        drop = tl.max(first - tl.load(gc + (head0 + (n - 1) * H) * VZ + rv, mask=rv < VZ, other=0.0), axis=0)
        if drop > gap_limit:
            _defer(i_cv * H + i_h, rare, rare_count)
        else:
            _value_gate_output(x, y, z, gc, w, out, head0, n, slot, tok, i_cv % NV, i_h, scale_inter, scale_intra,
                               H, KX, VZ, BT, BC, BK, BV, False, REVERSE, STRIDE_A, STRIDE_B, DT, PREC)


@triton.jit
def _value_gate_output(x, y, z, gc, w, out, head0, n, slot, tok, i_v, i_h, scale_inter, scale_intra,
                       H: tl.constexpr, KX: tl.constexpr, VZ: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, SUBBLOCKS: tl.constexpr, REVERSE: tl.constexpr,
                       STRIDE_A: tl.constexpr, STRIDE_B: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """_value_gate_output_kernel's work for one chunk (_chunk_rows' head0, n, slot, tok), head and column block
    i_v, in one of the two factorisations."""
    x += head0 * KX
    y += head0 * KX
    z += head0 * VZ
    gc += head0 * VZ
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    valid = rows < n
    last_tok = (n - 1) * H
    rv = i_v * BV + tl.arange(0, BV)
    w_base = w + (slot * H + i_h) * KX * VZ
    A0 = tl.zeros([BT, BT], dtype=tl.float32)
    inter = tl.zeros([BT, BV], dtype=tl.float32)
    for kb in range(tl.cdiv(KX, BK)):
        rk = kb * BK + tl.arange(0, BK)
        X = _load_rows(x, tok, rk, valid, KX).to(DT)
        Y = _load_rows(y, tok, rk, valid, KX).to(DT)
        Wt = tl.load(w_base + rk[:, None] * STRIDE_A + rv[None, :] * STRIDE_B,
                     mask=(rk < KX)[:, None] & (rv < VZ)[None, :], other=0.0)
        A0 += tl.dot(X, tl.trans(Y), input_precision=PREC)
        inter += tl.dot(X, Wt.to(DT), input_precision=PREC)
    A0 = tl.where(rows[:, None] >= cols[None, :], A0, 0.0)
    Z = _load_rows(z, tok, rv, valid, VZ).to(tl.float32)
    G = _load_gates(gc, tok, rv, valid, last_tok, VZ, REVERSE)
    if SUBBLOCKS:
        intra = _value_gate_subblocks(A0, z, gc, Z, G, tok, rv, n, last_tok, H, VZ, BT, BC, BV, REVERSE, DT, PREC)
    else:
        e = _exponent_from_first_row(gc, G, rv, valid, VZ, REVERSE)
        intra = tl.dot(A0, Z * tl.exp(-e), input_precision=PREC) * tl.exp(e)
    acc = scale_inter * inter * tl.exp(G) + scale_intra * intra
    tl.store(out + head0 * VZ + tok[:, None] * VZ + rv[None, :], acc.to(out.dtype.element_ty),
             mask=valid[:, None] & (rv < VZ)[None, :])


@triton.jit
def _value_gate_subblocks(A0, z, gc, Z, G, tok, rv, n, last_tok, H: tl.constexpr, VZ: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                          DT: tl.constexpr, PREC: tl.constexpr):
    """sum_{j <= i} A0_ij z_j * exp(bb_i - bb_j) with unbounded gate drops: through the reference of each sub-block
    off the diagonal sub-blocks, elementwise on them (A0 causal)."""
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    block_start = (rows // BC) * BC
    intra = tl.zeros([BT, BV], dtype=tl.float32)
    for I in tl.static_range(1, BT // BC):
        in_I = ((rows >= I * BC) & (rows < I * BC + BC))[:, None]
        r = tl.sum(tl.where((rows == I * BC)[:, None], G, 0.0), axis=0)
        ze = Z * tl.exp(tl.minimum(r[None, :] - G, 0.0))
        part = tl.dot(tl.where(in_I & (cols < I * BC)[None, :], A0, 0.0).to(DT), ze.to(DT), input_precision=PREC)
        intra += tl.where(in_I, part * tl.exp(tl.minimum(G - r[None, :], 0.0)), 0.0)
    for jj in range(BC):
        j, j_ok, tok_j = _diagonal_partner(rows, block_start + jj, n, H, REVERSE)
        Zj = _load_rows(z, tok_j, rv, j_ok, VZ).to(tl.float32)
        Gj = _load_gates(gc, tok_j, rv, j_ok, last_tok, VZ, REVERSE)
        a = tl.sum(tl.where(cols[None, :] == j[:, None], A0, 0.0), axis=1)
        intra += a[:, None] * Zj * tl.exp(tl.minimum(G - Gj, 0.0))
    return intra


@triton.jit
def _slot_softmax_kernel(scores, p, n_rows, M: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    """p = softmax(scores) over the M slots of each (token, head) row, written in p's dtype."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BM)
    mask = (rows < n_rows)[:, None] & (cols < M)[None, :]
    offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
    x = tl.where((cols < M)[None, :], tl.load(scores + offs, mask=mask, other=0.0), -float("inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    tl.store(p + offs, (e / tl.sum(e, axis=1)[:, None]).to(p.dtype.element_ty), mask=mask)


@triton.jit
def _slot_softmax_grad_kernel(scores, dp, dscores, n_rows, M: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    """dscores = p * (dp - sum(p * dp)) per (token, head) row, p = softmax(scores) recomputed in float32."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BM)
    mask = (rows < n_rows)[:, None] & (cols < M)[None, :]
    offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
    a = tl.where((cols < M)[None, :], tl.load(scores + offs, mask=mask, other=0.0), -float("inf"))
    e = tl.exp(a - tl.max(a, axis=1)[:, None])
    prob = e / tl.sum(e, axis=1)[:, None]
    g = tl.load(dp + offs, mask=mask, other=0.0)
    tl.store(dscores + offs, (prob * (g - tl.sum(prob * g, axis=1)[:, None])).to(dscores.dtype.element_ty), mask=mask)


@triton.jit
def _gate_terms_kernel(scores, p_in, dp, dscores, ds_v, ds_k, s, ds, x, n_elements, BLOCK: tl.constexpr):
    """ds = ds_v + ds_k (s is the value pass's key and the key pass's value) and the gate gradient's per-token terms
    of both passes, x = p_in * dp - s * ds_v (value pass: q*dq - k*dk) + scores * dscores - s * ds_k (key pass:
    o*do - v*dv), with the queries and cotangents in the dtype the kernels were fed."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    grad_s = tl.load(ds_v + offs, mask=mask, other=0.0) + tl.load(ds_k + offs, mask=mask, other=0.0)
    tl.store(ds + offs, grad_s.to(ds.dtype.element_ty), mask=mask)
    value_pass = tl.load(p_in + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(dp + offs, mask=mask, other=0.0)
    key_pass = tl.load(scores + offs, mask=mask, other=0.0) * tl.load(dscores + offs, mask=mask, other=0.0).to(tl.float32)
    terms = value_pass + key_pass - tl.load(s + offs, mask=mask, other=0.0).to(tl.float32) * grad_s
    tl.store(x + offs, terms, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------------------------
def chunk_cumsum(g: torch.Tensor, plan: Plan) -> torch.Tensor:
    B, T, H, D = g.shape
    gc = new_output((B, T, H, D), torch.float32, g.device)
    BD = _block(D)
    _chunk_cumsum_kernel[(plan.chunks.shape[0], H, triton.cdiv(D, BD))](g, gc, plan.chunks, H=H, D=D, BT=BT, BD=BD)
    return gc


def gate_grad(x: torch.Tensor, z: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
    B, T, H, D = x.shape
    dg = new_output((B, T, H, D), dtype, x.device)
    BD = _block(D)
    _gate_grad_kernel[(plan.chunks.shape[0], H, triton.cdiv(D, BD))](x, z, dg, plan.chunks, H=H, D=D, BT=BT, BD=BD)
    return dg


def _scan_args(x, y, gc, plan: Plan, gate_key: bool, reverse: bool, kind: str):
    if not KEY_GATE_SCAN_TRANSPOSED <= _SCAN_KINDS:
        raise ValueError(f"KEY_GATE_SCAN_TRANSPOSED must be a subset of {sorted(_SCAN_KINDS)}, "
                         f"got {sorted(KEY_GATE_SCAN_TRANSPOSED)}")
    H, K, V = x.shape[2], x.shape[3], y.shape[3]
    BK, BV = _block(K), _block(V)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), plan.units.shape[0] * H)
    return grid, dict(H=H, K=K, V=V, D=K if gate_key else V, BT=BT, BK=BK, BV=BV, BD=BK if gate_key else BV,
                      GATE_KEY=gate_key, REVERSE=reverse, TRANSPOSED=gate_key and kind in KEY_GATE_SCAN_TRANSPOSED,
                      **_dot_args(x.dtype))


def unit_initial_states(x, y, gc, init, plan: Plan, gate_key: bool, reverse: bool, scale: float):
    """The state entering every unit (in scan order): the sequence's initial state where a sequence is one unit;
    otherwise a first scan gives each unit's end state from zero and its total log decay, and _compose_kernel folds
    them along each sequence. float32 [U, H, K, V], or None for zero initial states of unsplit sequences."""
    if not plan.split:
        return init
    grid, meta = _scan_args(x, y, gc, plan, gate_key, reverse, "units")
    H, K, V, D = meta["H"], meta["K"], meta["V"], meta["D"]
    n_units = plan.units.shape[0]
    unit_end = new_output((n_units, H, K, V), torch.float32, x.device)
    log_decay = new_output((n_units, H, D), torch.float32, x.device)
    _state_scan_kernel[grid](x, y, gc, gc, gc, unit_end, log_decay, gc, gc, plan.chunks, plan.units, scale,
                             plan.n_slots, HAS_INIT=False, STORE=False, PER_UNIT=True, HAS_PAIR=False, **meta,
                             num_warps=SCAN_WARPS)
    unit_init = new_output((n_units, H, K, V), torch.float32, x.device)
    BLOCK = min(1024, triton.next_power_of_2(K * V))
    _compose_kernel[(triton.cdiv(K * V, BLOCK), H, plan.n_seqs)](
        unit_end, log_decay, gc if init is None else init, unit_init, plan.seq_units, H=H, K=K, V=V, D=D,
        BLOCK=BLOCK, GATE_KEY=gate_key, REVERSE=reverse, HAS_INIT=init is not None)
    return unit_init


def state_scan(x, y, gc, unit_init, plan: Plan, gate_key: bool, reverse: bool, scale: float, pair=None):
    """Boundary states of S (forward: x = k, y = v; reverse: x = q, y = do, giving state gradients), each unit
    starting from unit_init (see unit_initial_states).

    Returns (states [n_slots, H, K, V] in x's dtype, end [N, H, K, V] float32, z [n_slots, H, D] float32 or None):
    end is the final state forward and the initial state's gradient in reverse; z is the gate gradient's chunk-end
    term, computed when ``pair`` (the forward states) is given.
    """
    grid, meta = _scan_args(x, y, gc, plan, gate_key, reverse, "states" if pair is None else "pair")
    H, K, V, D = meta["H"], meta["K"], meta["V"], meta["D"]
    states = new_output((plan.n_slots, H, K, V), x.dtype, x.device)
    end = new_output((plan.n_seqs, H, K, V), torch.float32, x.device)
    pair_sum = None
    if pair is not None:
        pair_sum = new_output((grid[1] if gate_key else grid[0], plan.n_slots, H, D), torch.float32, x.device)
    _state_scan_kernel[grid](
        x, y, gc, gc if unit_init is None else unit_init, states, end, gc, gc if pair is None else pair,
        gc if pair_sum is None else pair_sum, plan.chunks, plan.units, scale, plan.n_slots,
        HAS_INIT=unit_init is not None, STORE=True, PER_UNIT=False, HAS_PAIR=pair is not None, **meta,
        num_warps=SCAN_WARPS)
    return states, end, None if pair_sum is None else pair_sum.sum(0)


def chunk_output(x, y, z, gc, w, plan: Plan, gate_key: bool, reverse: bool, w_transposed: bool,
                 scale_inter: float, scale_intra: float, out_dtype: torch.dtype,
                 rare_count: torch.Tensor) -> torch.Tensor:
    """out = scale_inter * inter + scale_intra * intra (see the output kernels), gate on x's dim (gate_key) or z's.
    rare_count: a zeroed int32 counter (one element, see rare_counters) for the list of sub-block chunks."""
    B, T, H, KX = x.shape
    VZ = z.shape[3]
    out = new_output((B, T, H, VZ), out_dtype, x.device)
    n_chunks = plan.chunks.shape[0]
    BK, BV = _block(KX), _block(VZ)
    NV = triton.cdiv(VZ, BV)
    meta = dict(H=H, KX=KX, BT=BT, BK=BK, REVERSE=reverse, **_dot_args(w.dtype))
    strides = dict(STRIDE_A=1 if w_transposed else VZ, STRIDE_B=KX if w_transposed else 1)
    items = n_chunks * (1 if gate_key else NV) * H  # the common launch's programs, any of which may defer
    rare = torch.empty(items, dtype=torch.int32, device=x.device)  # read only below the count the kernels write
    grids = ((items // H, H), (_rare_programs(items, x.device),))  # (common, sub-block) launch
    if gate_key:
        scores = new_output((B, T, H, BT), w.dtype, x.device)
        xg = new_output((B, T, H, KX), w.dtype, x.device)
        for subblocks, grid in zip((False, True), grids):
            _key_gate_scores_kernel[grid](x, y, gc, scores, xg, plan.chunks, rare, rare_count, scale_inter,
                                          scale_intra, GAP_LIMIT, BC=BC, SUBBLOCKS=subblocks, **meta,
                                          num_warps=SCORES_WARPS)
        _key_gate_output_kernel[(n_chunks * NV, H)](scores, xg, z, w, out, plan.chunks, VZ=VZ, BV=BV, NV=NV,
                                                    **strides, **meta, num_warps=STREAM_WARPS)
    else:
        for subblocks, grid in zip((False, True), grids):
            _value_gate_output_kernel[grid](x, y, z, gc, w, out, plan.chunks, rare, rare_count, scale_inter,
                                            scale_intra, GAP_LIMIT, VZ=VZ, BC=BC, BV=BV, NV=NV, SUBBLOCKS=subblocks,
                                            **strides, **meta, num_warps=VALUE_GATE_WARPS)
    return out


def _rare_programs(items: int, device: torch.device) -> int:
    """Programs of a sub-block launch: each walks every so-many entries of the list of deferred chunks (up to
    items) and exits at once past its length. Two per SM fill the GPU when every chunk is deferred (those kernels
    hold one 8-warp program per SM); on CPU (the interpreter) a few."""
    per_device = 2 * _sm_count(device) if device.type == "cuda" else 4
    return max(1, min(items, per_device))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def slot_softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    M = scores.shape[-1]
    p = new_output(scores.shape, dtype, scores.device)
    n_rows = scores.numel() // M
    BR = 64
    _slot_softmax_kernel[(triton.cdiv(n_rows, BR),)](scores, p, n_rows, M=M, BR=BR, BM=_block(M, 1024))
    return p


def slot_softmax_grad(scores, dp, dtype):
    M = scores.shape[-1]
    dscores = new_output(scores.shape, dtype, scores.device)
    n_rows = scores.numel() // M
    BR = 64
    _slot_softmax_grad_kernel[(triton.cdiv(n_rows, BR),)](scores, dp, dscores, n_rows, M=M, BR=BR,
                                                          BM=_block(M, 1024))
    return dscores


def gate_terms(scores, p_in, dp, dscores, ds_v, ds_k, s):
    """(ds in s's dtype, x float32): see _gate_terms_kernel."""
    ds = new_output(s.shape, s.dtype, s.device)
    x = new_output(s.shape, torch.float32, s.device)
    BLOCK = 1024
    _gate_terms_kernel[(triton.cdiv(s.numel(), BLOCK),)](scores, p_in, dp, dscores, ds_v, ds_k, s, ds, x, s.numel(),
                                                         BLOCK=BLOCK)
    return ds, x


def gla_forward(q, k, v, gc, plan: Plan, gate_key: bool, scale: float, h0, out_dtype, rare):
    """(o = scale * S_t^T q_t, final states float32, boundary states h, the units' initial states (what the
    backward needs to recompute h)). rare: a zeroed int32 counter for chunk_output."""
    unit_init = unit_initial_states(k, v, gc, h0, plan, gate_key, reverse=False, scale=1.0)
    h, final, _ = state_scan(k, v, gc, unit_init, plan, gate_key, reverse=False, scale=1.0)
    o = chunk_output(q, k, v, gc, h, plan, gate_key, False, False, scale, scale, out_dtype, rare)
    return o, final, h, unit_init


def gla_backward(q, k, v, gc, plan: Plan, gate_key: bool, scale: float, h, unit_init, do, dht, grad_dtypes, rare):
    """(dq, dk, dv, dh0, z): z [n_slots, H, D] is the chunk-end term of the gate gradient (see gate_grad).
    h: the forward's boundary states, or None to recompute them with one scan from unit_init (gla_forward's).
    rare: zeroed int32 counters, one per chunk_output call (3)."""
    if h is None:
        h, _, _ = state_scan(k, v, gc, unit_init, plan, gate_key, reverse=False, scale=1.0)
    unit_dht = unit_initial_states(q, do, gc, dht, plan, gate_key, reverse=True, scale=scale)
    dh, dh0, z = state_scan(q, do, gc, unit_dht, plan, gate_key, reverse=True, scale=scale, pair=h)
    dq_dtype, dk_dtype, dv_dtype = grad_dtypes
    dq = chunk_output(do, v, k, gc, h, plan, not gate_key, False, True, scale, scale, dq_dtype, rare[0])
    dk = chunk_output(v, do, q, gc, dh, plan, not gate_key, True, True, 1.0, scale, dk_dtype, rare[1])
    dv = chunk_output(k, q, do, gc, dh, plan, gate_key, True, False, 1.0, scale, dv_dtype, rare[2])
    return dq, dk, dv, dh0, z


def rare_counters(n: int, device: torch.device) -> torch.Tensor:
    """n zeroed int32 counters of chunks for chunk_output's sub-block launches (one memset for all of them)."""
    return torch.zeros(n, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Autograd functions and the public chunkwise API.
# ---------------------------------------------------------------------------------------------------------------
def float_state(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.float().contiguous()


def _kept(gc, h, g, unit_init) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the backward needs of one pass's states: (gc, h) with KEEP_FORWARD_STATES, else (g, unit_init)."""
    return (gc, h) if KEEP_FORWARD_STATES else (g, unit_init)


def _restore(kept, keep: bool, plan: Plan):
    """(gc, h, unit_init) from _kept's pair: h None when the backward recomputes it from unit_init."""
    if keep:
        return kept[0], kept[1], None
    return chunk_cumsum(kept[0], plan), None, kept[1]


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, cu_seqlens, gate_key):
        B, T, H, K = q.shape
        V = v.shape[3]
        plan = make_plan(cu_seqlens, B, T, q.device, H * triton.cdiv(K, 64) * triton.cdiv(V, 64))
        gc = chunk_cumsum(g, plan)
        o, final, h, unit_init = gla_forward(q, k, v, gc, plan, gate_key, scale, h0, v.dtype,
                                             rare_counters(1, q.device)[0])
        ctx.save_for_backward(q, k, v, *_kept(gc, h, g, unit_init), None if gate_key else o)
        ctx.plan, ctx.scale, ctx.gate_key, ctx.has_h0 = plan, scale, gate_key, h0 is not None
        ctx.keep, ctx.g_dtype = KEEP_FORWARD_STATES, g.dtype
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, *kept, o = ctx.saved_tensors
        plan, gate_key = ctx.plan, ctx.gate_key
        do = torch.zeros_like(v) if do is None else do.contiguous()
        gc, h, unit_init = _restore(kept, ctx.keep, plan)
        f32 = torch.float32
        grad_dtypes = (f32, f32, v.dtype) if gate_key else (q.dtype, k.dtype, f32)
        dq, dk, dv, dh0, z = gla_backward(q, k, v, gc, plan, gate_key, ctx.scale, h, unit_init, do,
                                          float_state(dfinal), grad_dtypes, rare_counters(3, q.device))
        # d/db of the chunk form: q*dq - k*dk with the gate on the keys, o*do - v*dv with it on the values
        x = q * dq - k * dk if gate_key else o.float() * do.float() - v.float() * dv
        dg = gate_grad(x.contiguous(), z, plan, ctx.g_dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, None, dh0 if ctx.has_h0 else None, None, None)


class ChunkGSAFunction(torch.autograd.Function):
    """GSA = key pass (value-gated GLA of q, k, s; output: scores) -> softmax -> value pass (key-gated GLA of p, s, v).

    Saved for the backward: the inputs, the scores (T x M floats, small next to q) and, with KEEP_FORWARD_STATES,
    both passes' boundary states, gc and p (else the units' initial states, from which one scan per pass
    recomputes the boundary states, and g).
    """

    @staticmethod
    def forward(ctx, q, k, v, s, g, scale, hk0, hv0, cu_seqlens):
        B, T, H, K = q.shape
        M, V = s.shape[3], v.shape[3]
        plan = make_plan(cu_seqlens, B, T, q.device, H * triton.cdiv(M, 64) * triton.cdiv(max(K, V), 64))
        gc = chunk_cumsum(g, plan)
        rare = rare_counters(2, q.device)
        scores, hk, h_k, unit_init_k = gla_forward(q, k, s, gc, plan, False, scale, hk0, torch.float32, rare[0])
        p = slot_softmax(scores, q.dtype)
        o, hv, h_v, unit_init_v = gla_forward(p, s, v, gc, plan, True, 1.0, hv0, v.dtype, rare[1])
        keep = KEEP_FORWARD_STATES
        ctx.save_for_backward(q, k, v, s, scores, p if keep else None, *_kept(gc, h_k, g, unit_init_k),
                              h_v if keep else unit_init_v)
        ctx.plan, ctx.scale, ctx.has_h0 = plan, scale, (hk0 is not None, hv0 is not None)
        ctx.keep, ctx.g_dtype = keep, g.dtype
        ctx.set_materialize_grads(False)
        return o, hk, hv

    @staticmethod
    def backward(ctx, do, dhk, dhv):
        q, k, v, s, scores, p_in, *kept_k, kept_v = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        f32 = torch.float32
        do = torch.zeros_like(v) if do is None else do.contiguous()
        gc, h_k, unit_init_k = _restore(kept_k, ctx.keep, plan)
        h_v, unit_init_v = (kept_v, None) if ctx.keep else (None, kept_v)
        if p_in is None:
            p_in = slot_softmax(scores, q.dtype)  # the value pass's queries, as the forward fed them
        rare = rare_counters(6, q.device)
        dp, ds_v, dv, dhv0, z_v = gla_backward(p_in, s, v, gc, plan, True, 1.0, h_v, unit_init_v, do,
                                               float_state(dhv), (f32, f32, v.dtype), rare[:3])
        dscores = slot_softmax_grad(scores, dp, q.dtype)
        dq, dk, ds_k, dhk0, z_k = gla_backward(q, k, s, gc, plan, False, scale, h_k, unit_init_k, dscores,
                                               float_state(dhk), (q.dtype, k.dtype, f32), rare[3:])
        ds, x = gate_terms(scores, p_in, dp, dscores, ds_v, ds_k, s)
        dg = gate_grad(x, z_v + z_k, plan, ctx.g_dtype)
        return (dq, dk, dv, ds, dg, None, dhk0 if ctx.has_h0[0] else None, dhv0 if ctx.has_h0[1] else None, None)


def _check_common(q, k, v, cu_seqlens, scale):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H; got {tuple(v.shape)} for q {tuple(q.shape)}")
    for t in (q, k, v):
        if not t.is_floating_point() or t.device != q.device:
            raise ValueError(f"inputs must be floating tensors on one device; got {t.dtype} on {t.device}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale}")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])


def _check_state(state, shape, name):
    if state is not None and tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ([N, H, ...], N sequences), got {tuple(state.shape)}")


def check_gsa_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens):
    _check_common(q, k, v, cu_seqlens, scale)
    if s.shape != g.shape or s.dim() != 4 or s.shape[:3] != q.shape[:3]:
        raise ValueError(f"s and g must both be [B, T, H, M] with q's B, T, H; got {tuple(s.shape)}, {tuple(g.shape)}")
    if not (s.is_floating_point() and g.is_floating_point()):
        raise ValueError(f"s and g must be floating tensors; got {s.dtype} and {g.dtype}")
    if len({q.dtype, k.dtype, v.dtype, s.dtype}) != 1:
        raise ValueError(f"q, k, v, s must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}, {s.dtype}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be None or a pair (hk0 [N, H, K, M], hv0 [N, H, M, V])")
        B, _, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        M, V = s.shape[3], v.shape[3]
        _check_state(initial_state[0], (N, H, K, M), "initial_state[0] (hk0)")
        _check_state(initial_state[1], (N, H, M, V), "initial_state[1] (hv0)")


def check_gla_inputs(q, k, v, g, scale, initial_state, cu_seqlens, gate_on):
    _check_common(q, k, v, cu_seqlens, scale)
    if gate_on not in ("key", "value"):
        raise ValueError(f"gate_on must be 'key' or 'value', got {gate_on!r}")
    gate_dim = q.shape[3] if gate_on == "key" else v.shape[3]
    if g.shape != (*q.shape[:3], gate_dim) or not g.is_floating_point():
        raise ValueError(f"g must be a floating [B, T, H, {'K' if gate_on == 'key' else 'V'}] = "
                         f"{(*q.shape[:3], gate_dim)} tensor with gate_on={gate_on!r}; got {tuple(g.shape)} {g.dtype}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, _, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    _check_state(initial_state, (N, H, K, v.shape[3]), "initial_state")


def chunk_gated_linear_attention(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                                 cu_seqlens=None, gate_on="key"):
    """Gated linear attention, chunkwise: S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K]: log decays (<= 0; float32 recommended), or with
    gate_on="value" g [B, T, H, V] and S_t = S_{t-1} diag(exp g_t) + k_t v_t^T. A scalar decay per head (Mamba2's
    SSD) is g broadcast over K. scale defaults to K^-1/2. initial_state [N, H, K, V] (float32) or None, N = B or the
    number of documents packed along T by cu_seqlens (int64 offsets, B = 1).
    Returns (o [B, T, H, V], final state [N, H, K, V] float32, or None unless output_final_state).
    Gradients reach q, k, v, g and the initial state, and flow in from the final state.
    """
    check_gla_inputs(q, k, v, g, scale, initial_state, cu_seqlens, gate_on)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    if use_triton(q):
        o, final = ChunkGLAFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale,
                                          float_state(initial_state), cu_seqlens, gate_on == "key")
    else:
        o, final = gla_chunk_torch(q, k, v, g, scale, initial_state, cu_seqlens, gate_on == "key")
    return o, (final if output_final_state else None)


def chunk_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated Slot Attention, chunkwise (the recurrence is in reference.py).

    q, k [B, T, H, K]; v [B, T, H, V]; s (slot writes), g (slot log decays, <= 0) [B, T, H, M]; scale defaults to
    K^-1/2; initial_state None or (hk0 [N, H, K, M], hv0 [N, H, M, V]), float32, N = B or the number of documents
    packed along T by cu_seqlens (int64 offsets, B = 1).
    Returns (o [B, T, H, V], (hk [N, H, K, M], hv [N, H, M, V]) float32, or (None, None) unless output_final_state).
    Gradients reach every input and the initial states, and flow in from the final states.
    """
    check_gsa_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    if use_triton(q):
        o, hk, hv = ChunkGSAFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(),
                                           g.contiguous(), scale, float_state(hk0), float_state(hv0), cu_seqlens)
    else:
        o, hk, hv = gsa_chunk_torch(q, k, v, s, g, scale, initial_state, cu_seqlens)
    return o, ((hk, hv) if output_final_state else (None, None))
