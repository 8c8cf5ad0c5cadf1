"""The specifications of the ssm_fft ops as direct sums and token-by-token loops: the oracles of their tests.

Slow on purpose; float64 when given float64 inputs (complex128 states), float32 otherwise.
"""
from __future__ import annotations

import torch


def causal_conv_reference(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_{j <= t} k[c, t - j] u[b, j, c] as an explicit sum over lags: u [B, T, C], k [C, Tk]."""
    length = u.shape[1]
    y = torch.zeros_like(u)
    for lag in range(k.shape[1]):
        y = y + torch.nn.functional.pad(u[:, : length - lag], (0, 0, lag, 0)) * k[:, lag]
    return y


def s4d_ssm_reference(u, log_dt, A_real_log, A_imag, B, C, D=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None):
    """The S4D recurrence x_t = Abar x_{t-1} + Bbar u_t, y_t = Re(C x_t) + D u_t, one token at a time.

    ZOH: Abar = exp(dt A), Bbar = (Abar - 1) / A B, dt = exp(log_dt), A = -exp(A_real_log) + i A_imag.
    u [B, T, H]; log_dt [H]; A_real_log, A_imag [H, N]; B, C [H, N, 2] (re, im); D [H]; initial_state
    [N_seq, H, N, 2]. Each document of cu_seqlens (B = 1) restarts from its own initial state.
    Returns y [B, T, H] and the final states [N_seq, H, N, 2] (or None).
    """
    batch, length, H = u.shape
    real = torch.promote_types(u.dtype, torch.float32)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    dt = torch.exp(log_dt.to(real))[:, None]
    A = torch.complex(-torch.exp(A_real_log.to(real)), A_imag.to(real))
    Abar = torch.exp(dt * A)
    Bbar = (Abar - 1) / A * torch.view_as_complex(B.to(real).contiguous())
    Cc = torch.view_as_complex(C.to(real).contiguous())
    if cu_seqlens is None:
        spans = [(b, 0, length) for b in range(batch)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is None:
            x = torch.zeros(H, A.shape[1], dtype=cplx, device=u.device)
        else:
            x = torch.view_as_complex(initial_state[n].to(real).contiguous())
        for t in range(start, end):
            x = Abar * x + Bbar * u[b, t].to(real)[:, None]
            y_t = (Cc * x).sum(-1).real
            if D is not None:
                y_t = y_t + D.to(real) * u[b, t].to(real)
            rows[b].append(y_t)
        finals.append(torch.view_as_real(x))
    y = torch.stack([torch.stack(r) for r in rows]).to(u.dtype)
    return y, (torch.stack(finals) if output_final_state else None)


def s4d_kernel_reference(log_dt, A_real_log, A_imag, B, C, length: int) -> torch.Tensor:
    """The impulse response of the recurrence: k[h, s] = y_s for u = (1, 0, 0, ...) on every channel: [H, length]."""
    H = log_dt.shape[0]
    impulse = torch.zeros(1, length, H, dtype=log_dt.dtype, device=log_dt.device)
    impulse[0, 0] = 1
    y, _ = s4d_ssm_reference(impulse, log_dt, A_real_log, A_imag, B, C)
    return y[0].t()
