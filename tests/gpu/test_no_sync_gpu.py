"""The recurrent kernels make no device-to-host synchronisation per call when the documents' offsets come from a
layout moved to the GPU (lctrain.kernels.common.host_offsets): each such copy would make the host wait for the
GPU's queued work and then leave the GPU idle while it launches the next kernels (the 16k step's forward showed
~26 ms of gaps between kernels on an H100 while each Gated DeltaNet call synchronised five times)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.gated_delta import chunk_gated_delta_rule
from lctrain.kernels.gsa import chunk_gsa
from lctrain.kernels.ssm_fft import s4d_ssm
from lctrain.kernels.ssm_fft.s4d import s4d_lin_init
from lctrain.model.layout import layout_from_cu_seqlens

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_synchronisation():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _cu_seqlens(T: int) -> torch.Tensor:
    layout = layout_from_cu_seqlens(torch.tensor([0, 300, 301, T]), 1, T).to("cuda")
    return layout.cu_seqlens


def test_gated_delta_rule_does_not_synchronise():
    T, H, K = 1024, 2, 64
    q, k, v = (torch.randn(1, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, device="cuda")).requires_grad_()
    beta = torch.rand(1, T, H, device="cuda", requires_grad=True)
    cu = _cu_seqlens(T)
    chunk_gated_delta_rule(q, F.normalize(k, dim=-1), v, g, beta, cu_seqlens=cu)  # compile outside the check
    with no_synchronisation():
        o, _ = chunk_gated_delta_rule(q, F.normalize(k, dim=-1), v, g, beta, cu_seqlens=cu)
        o.float().square().sum().backward()


def test_gsa_does_not_synchronise():
    T, H, K, M = 1024, 2, 64, 16
    q, k, v = (torch.randn(1, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    f = F.logsigmoid(torch.randn(1, T, H, M, device="cuda")) / 8
    s, g = (1 - f.exp()).bfloat16().requires_grad_(), f.requires_grad_()
    cu = _cu_seqlens(T)
    chunk_gsa(q, k, v, s, g, cu_seqlens=cu)
    with no_synchronisation():
        o, _ = chunk_gsa(q, k, v, s, g, cu_seqlens=cu)
        o.float().square().sum().backward()


def test_s4d_does_not_synchronise():
    T, channels = 1024, 64
    params = {name: p.cuda().requires_grad_() for name, p in s4d_lin_init(channels).items()}
    u = torch.randn(1, T, channels, device="cuda", requires_grad=True)
    cu = _cu_seqlens(T)
    s4d_ssm(u, **params, cu_seqlens=cu)
    with no_synchronisation():
        y = s4d_ssm(u, **params, cu_seqlens=cu)
        y = y[0] if isinstance(y, tuple) else y
        y.square().sum().backward()
