"""SSM-FFT: long causal convolutions by FFT on tensor cores, and the S4D SSM built on them (Block-State Transformer).

  causal_fft_conv(u, k)          y[b, t, c] = sum_{j<=t} k[c, t-j] u[b, j, c]; u [B, T, C], k [C, Tk <= T]
  causal_fft_conv_torch(u, k)    the same through torch.fft (rfft, multiply, irfft): fallback and benchmark peer
  s4d_kernel(log_dt, A_real_log, A_imag, B, C, T) -> k [H, T]       the SSM's convolution kernel (ZOH)
  s4d_ssm(u, log_dt, A_real_log, A_imag, B, C, D=None, initial_state=None, output_final_state=False,
          cu_seqlens=None) -> (y, final_state)                     conv + boundary states + document resets
  s4d_transition(log_dt, A_real_log, A_imag, L) -> Abar^L          the state map of a segment of L tokens
  s4d_discretize(log_dt, A_real_log, A_imag, B) -> (dt A, Bbar)    complex128 [H, N] each
  s4d_lin_init(H, N=16) -> dict of parameters                      S4D-Lin initialisation (keys = s4d_ssm's args)

States are real pairs [N_seq, H, N, 2] (float32); see s4d.py for the parameterisation and the equations.
"""
from .fftconv import causal_fft_conv, causal_fft_conv_torch
from .s4d import s4d_discretize, s4d_kernel, s4d_lin_init, s4d_ssm, s4d_transition

__all__ = ["causal_fft_conv", "causal_fft_conv_torch", "s4d_discretize", "s4d_kernel", "s4d_lin_init", "s4d_ssm",
           "s4d_transition"]
