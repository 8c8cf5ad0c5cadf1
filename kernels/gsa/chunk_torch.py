"""The torch path (CPU without the Triton interpreter): chunkwise gated linear attention and GSA in plain torch ops.

Same algorithm as chunk.py, vectorised over chunks and differentiated by autograd; fast enough to train a small model
on CPU. Within a chunk of C tokens the log gates are cumulated in float32, b_i = g_1 + ... + g_i, and every
exponential is of a difference b_i - b_j with j <= i, which is <= 0 for gates g <= 0, so nothing overflows however
strong the gate. Across chunks the states follow the chunk recurrence
    key gate:   S_c+1 = diag(exp b_C) S_c + (k * exp(b_C - b))^T v
    value gate: S_c+1 = S_c diag(exp b_C) + k^T (v * exp(b_C - b))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 16  # C: the [C, C, D] decay tensor of each chunk stays small at this size


def _dense_gla(q, k, v, g, scale, h0, gate_key: bool):
    """One batch of equal-length sequences: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K or V] -> (o, final)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    pad = (-T) % CHUNK  # padded tokens have k = v = 0 and g = 0: they leave the state as it is
    n = (T + pad) // CHUNK

    def chunks(x):  # [B, T, H, D] -> [B, H, n, C, D]
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, n, CHUNK, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v, b = chunks(q), chunks(k), chunks(v), chunks(g).cumsum(-2)
    last = b[..., -1:, :]  # [B, H, n, 1, D]: log decay of the whole chunk
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    # exp(b_i - b_j) for j <= i, zero above the diagonal; clamping keeps the masked half finite (and its grads zero)
    decay = (b[..., :, None, :] - b[..., None, :, :]).clamp(max=0).exp() * causal[..., None]
    if gate_key:
        intra = torch.einsum("...id,...jd,...ijd->...ij", q, k, decay) @ v
        update = (k * (last - b).exp()).transpose(-1, -2) @ v
    else:
        intra = torch.einsum("...ij,...jd,...ijd->...id", (q @ k.transpose(-1, -2)) * causal, v, decay)
        update = k.transpose(-1, -2) @ (v * (last - b).exp())
    carry = last.squeeze(-2).exp()  # [B, H, n, D]
    carry = carry[..., :, None] if gate_key else carry[..., None, :]
    S = q.new_zeros(B, H, K, V) if h0 is None else h0.to(dtype)
    starts = []
    for c in range(n):
        starts.append(S)
        S = carry[:, :, c] * S + update[:, :, c]
    starts = torch.stack(starts, dim=2)  # [B, H, n, K, V]: state before each chunk
    if gate_key:
        inter = (q * b.exp()) @ starts
    else:
        inter = (q @ starts) * b.exp()
    o = scale * (inter + intra)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * CHUNK, H, V)[:, :T]
    return o, S


def _per_sequence(fn, tensors, h0, cu_seqlens):
    """Run fn(tensors..., h0) per packed document (B = 1) and put the pieces back; fn -> (o, final)."""
    if cu_seqlens is None:
        return fn(*tensors, h0)
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(offsets) - 1):
        piece = [t[:, offsets[n]:offsets[n + 1]] for t in tensors]
        o, final = fn(*piece, None if h0 is None else h0[n:n + 1])
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)


def gla_chunk_torch(q, k, v, g, scale, initial_state, cu_seqlens, gate_key: bool):
    """Gated linear attention (see reference.py); returns (o in v's dtype, final state in float32 or wider)."""
    state_dtype = torch.promote_types(q.dtype, torch.float32)

    def run(q_, k_, v_, g_, h0):
        if q_.shape[1] == 0:
            zero = q_.new_zeros(q_.shape[0], q_.shape[2], q_.shape[3], v_.shape[3], dtype=state_dtype)
            return v_.new_zeros(v_.shape), zero if h0 is None else h0.to(state_dtype)
        return _dense_gla(q_, k_, v_, g_, scale, h0, gate_key)

    o, final = _per_sequence(run, (q, k, v, g), initial_state, cu_seqlens)
    return o.to(v.dtype), final.to(state_dtype)


def gsa_chunk_torch(q, k, v, s, g, scale, initial_state, cu_seqlens):
    """GSA as two gated linear-attention passes joined by a softmax; returns (o, hk, hv), states in float32 or wider."""
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    wide = torch.promote_types(s.dtype, torch.float32)  # the scores feed a softmax: keep them at least float32
    scores, hk = gla_chunk_torch(q, k, s.to(wide), g, scale, hk0, cu_seqlens, gate_key=False)
    p = torch.softmax(scores, dim=-1)
    o, hv = gla_chunk_torch(p, s, v, g, 1.0, hv0, cu_seqlens, gate_key=True)
    return o, hk, hv
