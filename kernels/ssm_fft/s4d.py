"""S4D: a diagonal complex state-space model per channel, run as one long convolution plus boundary-state terms.

Per channel h (H channels) with N complex modes (Gu, Gupta, Goel & Re, "On the Parameterization and Initialization
of Diagonal State Space Models", 2022):

    continuous   x'(t) = A x(t) + B u(t),  y(t) = Re(C x(t)),   A = diag(-exp(A_real_log) + i A_imag)
    ZOH          Abar = exp(dt A),  Bbar = (Abar - 1) / A * B,  dt = exp(log_dt)
    recurrence   x_t = Abar x_{t-1} + Bbar u_t,   y_t = Re(C x_t) + D u_t,   x_{-1} = x_0 (the initial state)

(the real part of A is -exp(.), so it stays negative and |Abar| < 1 for any parameter values). Unrolled:

    y_t = sum_{j <= t} k[t - j] u_j + Re(C Abar^{t+1} x_0) + D u_t,    k[s] = Re(sum_n C_n Bbar_n Abar_n^s)
    x_{T-1} = Abar^T x_0 + sum_t Abar^{T-1-t} Bbar u_t                       (the final state)

so the SSM is ``causal_fft_conv(u, k)`` plus two terms that involve only the N-dimensional boundary states.

Parameters are real tensors (no complex parameters, so optimizers and ZeRO see ordinary float tensors):
log_dt [H], A_real_log [H, N], A_imag [H, N], B [H, N, 2] and C [H, N, 2] (real, imaginary pairs), D [H] optional.
States are float32 real pairs [N_seq, H, N, 2] (float64 when the inputs are float64): view_as_complex gives x.

Every Vandermonde product (the kernel, the initial-state term, the final state) uses one two-level split of the
exponent s = q L + r (L ~ sqrt(T)): Abar^s = Abar^{qL} Abar^r, so a length-T readout per channel is one batched
[blocks, 2N] x [2N, L] real matrix product (Re(p v) = p_re v_re - p_im v_im) and nothing of size H * N * T is ever
formed. The exponentials are taken in complex128 on the small factors (exact phases at large s), the products in
the compute dtype; torch autograd gives the gradients of every parameter and state.
"""
from __future__ import annotations

import math

import torch

from ..common import check_cu_seqlens, device_table, host_offsets, use_triton
from .fftconv import CausalFFTConvFunction, causal_fft_conv_torch, default_plan


def s4d_lin_init(H: int, N: int = 16, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """S4D-Lin initial parameters (Gu et al. 2022, Sec. 4): A_n = -1/2 + i pi n, B_n = 1, C_n ~ CN(0, 1),
    dt log-uniform in [dt_min, dt_max], D ~ N(0, 1). float32 tensors keyed as s4d_ssm's arguments."""
    A_imag = (math.pi * torch.arange(N, dtype=torch.float32)).expand(H, N).clone()
    log_dt = torch.rand(H, generator=generator) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    return {"log_dt": log_dt, "A_real_log": torch.full((H, N), math.log(0.5)), "A_imag": A_imag,
            "B": torch.stack([torch.ones(H, N), torch.zeros(H, N)], dim=-1),
            "C": torch.randn(H, N, 2, generator=generator) * math.sqrt(0.5), "D": torch.randn(H, generator=generator)}


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_params(log_dt, A_real_log, A_imag, B=None, C=None) -> tuple[int, int]:
    if A_real_log.dim() != 2 or A_imag.shape != A_real_log.shape:
        raise ValueError(f"A_real_log and A_imag must both be [H, N]; got {tuple(A_real_log.shape)} and "
                         f"{tuple(A_imag.shape)}")
    H, N = A_real_log.shape
    if log_dt.shape != (H,):
        raise ValueError(f"log_dt must be [H] = [{H}]; got {tuple(log_dt.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t is not None and t.shape != (H, N, 2):
            raise ValueError(f"{name} must be [H, N, 2] = [{H}, {N}, 2] (real, imaginary); got {tuple(t.shape)}")
    return H, N


def s4d_discretize(log_dt, A_real_log, A_imag, B=None):
    """ZOH: (dt A, Bbar) in complex128, each [H, N]; Abar = exp(dt A). Bbar is None when B is None."""
    dt = torch.exp(log_dt.double())[:, None]
    A = torch.complex(-torch.exp(A_real_log.double()), A_imag.double())
    dtA = dt * A
    if B is None:
        return dtA, None
    return dtA, torch.expm1(dtA) / A * torch.view_as_complex(B.double().contiguous())


def _block_size(length: int) -> int:
    return max(16, 1 << math.ceil(math.log2(max(1.0, math.sqrt(length)))))


def _decay_readout(weights: torch.Tensor, dtA: torch.Tensor, lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """out[h, start_d + o] = Re(sum_n weights[d, h, n] exp(dtA[h, n] o)) for o < lengths[d]: [H, sum(lengths)].

    weights [D, H, N] complex128. Each sequence is cut into blocks of L from its start; block (d, q) carries the
    weight weights[d] Abar^{qL}, and one bmm with the shared [2N, L] table of Abar^r fills all blocks.
    """
    H, N = dtA.shape
    block = _block_size(max(lengths))
    per_doc = torch.tensor([-(-n // block) for n in lengths])
    doc_of_block = device_table(torch.repeat_interleave(torch.arange(len(lengths)), per_doc), dtA.device, torch.int64)
    first_block = torch.cumsum(per_doc, 0) - per_doc
    q = device_table(torch.arange(int(per_doc.sum())) - torch.repeat_interleave(first_block, per_doc), dtA.device,
                     torch.int64)
    block_weights = weights[doc_of_block] * torch.exp(dtA * (q * block).to(torch.float64)[:, None, None])
    powers = torch.exp(dtA[..., None] * torch.arange(block, device=dtA.device, dtype=torch.float64))  # [H, N, L]
    left = torch.cat([block_weights.real, -block_weights.imag], dim=-1).transpose(0, 1).to(dtype)  # [H, nb, 2N]
    right = torch.cat([powers.real, powers.imag], dim=1).to(dtype)  # [H, 2N, L]
    flat = torch.bmm(left, right).reshape(H, -1)
    if len(lengths) == 1:
        return flat[:, : lengths[0]]
    index = device_table(torch.cat([first_block[d] * block + torch.arange(n) for d, n in enumerate(lengths)]),
                         flat.device, torch.int64)
    return flat[:, index]


def _decay_readin(u: torch.Tensor, dtA: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """E[d, h, n] = sum_{o < len_d} Abar[h, n]^o u[end_d - 1 - o, h] for u [sum(lengths), H]: [D, H, N] complex128.

    The transpose of _decay_readout: blocks of L counted back from each sequence's end, one bmm with the [L, 2N]
    table, then each block's Abar^{qL} and a sum over the blocks of a sequence.
    """
    H, N = dtA.shape
    block = _block_size(max(lengths))
    per_doc = torch.tensor([-(-n // block) for n in lengths])
    ends = torch.cumsum(torch.tensor(lengths), 0)
    doc_of_block = torch.repeat_interleave(torch.arange(len(lengths)), per_doc)
    q = torch.arange(int(per_doc.sum())) - torch.repeat_interleave(torch.cumsum(per_doc, 0) - per_doc, per_doc)
    offset = q[:, None] * block + torch.arange(block)[None, :]  # [nb, L]: distance from the sequence's last token
    valid = offset < torch.tensor(lengths)[doc_of_block][:, None]
    position = device_table(torch.where(valid, ends[doc_of_block][:, None] - 1 - offset, 0), u.device, torch.int64)
    gathered = u.t()[:, position] * device_table(valid, u.device, u.dtype)  # [H, nb, L]
    powers = torch.exp(dtA[..., None] * torch.arange(block, device=dtA.device, dtype=torch.float64))  # [H, N, L]
    table = torch.cat([powers.real, powers.imag], dim=1).transpose(1, 2).to(u.dtype)  # [H, L, 2N]
    partial = torch.bmm(gathered, table).double()  # [H, nb, 2N]
    partial = torch.complex(partial[..., :N], partial[..., N:]).transpose(0, 1)  # [nb, H, N]
    doc_of_block, q = device_table(doc_of_block, dtA.device, torch.int64), device_table(q, dtA.device, torch.int64)
    partial = partial * torch.exp(dtA * (q * block).to(torch.float64)[:, None, None])
    return torch.zeros(len(lengths), H, N, dtype=partial.dtype, device=partial.device).index_add(0, doc_of_block,
                                                                                               partial)


def s4d_kernel(log_dt, A_real_log, A_imag, B, C, length: int) -> torch.Tensor:
    """k[h, s] = Re(sum_n C[h, n] Bbar[h, n] Abar[h, n]^s) for s < length: [H, length], float32 (float64 for
    float64 parameters). Differentiable in every parameter."""
    _check_params(log_dt, A_real_log, A_imag, B, C)
    dtA, Bbar = s4d_discretize(log_dt, A_real_log, A_imag, B)
    weights = (torch.view_as_complex(C.double().contiguous()) * Bbar)[None]
    return _decay_readout(weights, dtA, [length], _compute_dtype(log_dt, A_real_log, A_imag, B, C))


def s4d_transition(log_dt, A_real_log, A_imag, length) -> torch.Tensor:
    """Abar^length = exp(length dt A) as real pairs: [H, N, 2] for an int length, [R, H, N, 2] for a tensor of R
    lengths. The linear map a segment of ``length`` tokens applies to the state (context parallelism's M_r)."""
    _check_params(log_dt, A_real_log, A_imag)
    dtA, _ = s4d_discretize(log_dt, A_real_log, A_imag)
    steps = torch.as_tensor(length, dtype=torch.float64, device=dtA.device)
    power = torch.exp(dtA * steps[..., None, None])
    return torch.view_as_real(power).to(_compute_dtype(log_dt, A_real_log, A_imag))


def _affine_prefix(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """States entering each of D segments when segment d maps x -> a[d] x + e[d], starting from 0: [D, ...].

    A Hillis-Steele scan of the composition (a2, e2) o (a1, e1) = (a2 a1, a2 e1 + e2), log2(D) steps."""
    step = 1
    while step < a.shape[0]:
        e = torch.cat([e[:step], a[step:] * e[:-step] + e[step:]])
        a = torch.cat([a[:step], a[step:] * a[:-step]])
        step *= 2
    return torch.cat([torch.zeros_like(e[:1]), e[:-1]])


def _conv(u: torch.Tensor, k: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if use_triton(u):
        return CausalFFTConvFunction.apply(u, k, default_plan(u, k), out_dtype)
    return causal_fft_conv_torch(u, k).to(out_dtype)


def s4d_ssm(
    u: torch.Tensor,
    log_dt: torch.Tensor,
    A_real_log: torch.Tensor,
    A_imag: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The S4D SSM over u [B, T, H]: returns y [B, T, H] (u's dtype) and, if asked, the final states.

    initial_state / final state: [N_seq, H, N, 2] real pairs (N_seq = B, or the number of documents), float32
    (float64 for float64 inputs); gradients flow into initial_state and from the final state. D (skip) is added
    when given.

    Documents (cu_seqlens, B = 1): each starts from its own initial state (zero when none is given). The convolution
    runs once over the packed row; the tokens of document d then also hold the leak of earlier documents,
    Re(C Abar^{t - s_d + 1} P_d) with P_d the packed state entering d (P_{d+1} = Abar^{len_d} P_d + E_d, E_d the
    zero-start final state of d: a scan over documents). So y gets Re(C Abar^{t - s_d + 1} (x0_d - P_d)): one
    readout of O(T H N) multiply-adds on top of the convolution, exact in exact arithmetic; in floating point the
    leak's rounding stays in the result, a relative error of the packed output's size (the convolution then
    writes float32 even for bfloat16 u, so the cancellation costs float32, not bfloat16, rounding).
    """
    H, N = _check_params(log_dt, A_real_log, A_imag, B, C)
    if u.dim() != 3 or u.shape[2] != H:
        raise ValueError(f"u must be [B, T, H] with H = {H}; got {tuple(u.shape)}")
    batch, length, _ = u.shape
    check_cu_seqlens(cu_seqlens, batch, length)
    lengths = [length] * batch if cu_seqlens is None else host_offsets(cu_seqlens).diff().tolist()
    sequences = len(lengths)
    if initial_state is not None and initial_state.shape != (sequences, H, N, 2):
        raise ValueError(f"initial_state must be [N_seq, H, N, 2] = [{sequences}, {H}, {N}, 2]; "
                         f"got {tuple(initial_state.shape)}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D must be [H] = [{H}]; got {tuple(D.shape)}")
    dtype = _compute_dtype(u, log_dt, A_real_log, A_imag, B, C, initial_state)
    dtA, Bbar = s4d_discretize(log_dt, A_real_log, A_imag, B)
    Cc = torch.view_as_complex(C.double().contiguous())
    k = _decay_readout((Cc * Bbar)[None], dtA, [length], dtype)

    leaking = cu_seqlens is not None and sequences > 1
    corrected = leaking or initial_state is not None
    y = _conv(u, k, dtype if corrected else u.dtype)

    x0 = None if initial_state is None else torch.view_as_complex(initial_state.double().contiguous())
    # lengths of 0 are legal documents: they carry their initial state through unchanged and own no tokens
    live = [d for d, n in enumerate(lengths) if n > 0]
    need_readin = output_final_state or leaking
    E = None
    if need_readin and live:
        flat = u.reshape(batch * length, H).to(dtype)
        E = torch.zeros(sequences, H, N, dtype=torch.complex128, device=u.device)
        E = E.index_copy(0, device_table(torch.tensor(live), u.device, torch.int64),
                         _decay_readin(flat, dtA, [lengths[d] for d in live]))
        E = E * Bbar
    if corrected and live:
        start = torch.zeros(sequences, H, N, dtype=torch.complex128, device=u.device) if x0 is None else x0
        if leaking:
            passing = torch.exp(dtA * device_table(torch.tensor(lengths), u.device, torch.float64)[:, None, None])
            start = start - _affine_prefix(passing, E)
        live_index = device_table(torch.tensor(live), u.device, torch.int64)
        weights = (Cc * torch.exp(dtA))[None] * start[live_index]
        correction = _decay_readout(weights, dtA, [lengths[d] for d in live], dtype)  # [H, B T]
        y = y + correction.t().reshape(batch, length, H)
    if D is not None:
        y = y + D.to(dtype) * u.to(dtype)
    y = y.to(u.dtype)

    final = None
    if output_final_state:
        final = torch.zeros(sequences, H, N, dtype=torch.complex128, device=u.device) if E is None else E
        if x0 is not None:
            final = final + torch.exp(dtA * torch.tensor(lengths, dtype=torch.float64,
                                                         device=u.device)[:, None, None]) * x0
        final = torch.view_as_real(final).to(dtype)
    return y, final
