"""Gated delta rule kernels on a GPU: bf16 inputs against the float64 token loop (reference.py) run on the same GPU,
through kernel_checks.compare_with_reference (outputs poisoned; values, final states and every gradient, initial
states included, within 1e-2 relative error, no NaN). Long sequences (up to 16k tokens, split into segments that
run in parallel), packed documents, many short segments, K != V, the recurrent kernel.

On Hopper with Triton 3.4-3.6 flash-linear-attention refuses its own gated backward (a miscompile, its issue #640):
these tests are the check that lctrain's kernels are right on that stack.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import compare_with_reference
from lctrain.kernels.gated_delta import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                         gated_delta_rule_reference)
from lctrain.kernels.gated_delta.chunk import chunk_gated_delta_rule_triton

pytestmark = pytest.mark.gpu
TOL = 1e-2


def make_inputs(B, T, H, HV, K, V, seed, docs=None, dtype=torch.bfloat16, gate_shift=3.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    N = B if docs is None else len(docs)
    x = {
        "q": randn(B, T, H, K).to(dtype),
        "k": F.normalize(randn(B, T, H, K), dim=-1).to(dtype),
        "v": randn(B, T, HV, V).to(dtype),
        "g": F.logsigmoid(randn(B, T, HV) + gate_shift),
        "beta": randn(B, T, HV).sigmoid().to(dtype),
        "initial_state": randn(N, HV, K, V),
    }
    if docs is not None:
        x["cu_seqlens"] = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device="cuda")
    return x


def op(fn, **fixed):
    def run(q, k, v, g, beta, initial_state, cu_seqlens=None):
        return fn(q, k, v, g, beta, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens,
                  **fixed)
    return run


def segmented(segment_chunks):
    def fn(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
        return chunk_gated_delta_rule_triton(q, k, v, g, beta, q.shape[-1] ** -0.5, initial_state, output_final_state,
                                             cu_seqlens, segment_chunks)
    return fn


REFERENCE = op(gated_delta_rule_reference)


def test_strong_gates():
    """Decays down to exp(-10) per token."""
    x = make_inputs(1, 4096, 2, 2, 128, 128, seed=3, gate_shift=-2.0)
    x["g"] = x["g"] * 3
    print(compare_with_reference(op(chunk_gated_delta_rule), REFERENCE, x, TOL))


def test_fused_recurrent_decode():
    """Decoding three tokens from a carried state; gradients through the chunk backward."""
    x = make_inputs(2, 3, 2, 4, 128, 128, seed=4)
    print(compare_with_reference(op(fused_recurrent_gated_delta_rule), REFERENCE, x, TOL))


def test_other_widths_fp16():
    """K != V, neither 128, float16, a batch of two sequences."""
    x = make_inputs(2, 1000, 2, 2, 64, 96, seed=5, dtype=torch.float16)
    print(compare_with_reference(op(chunk_gated_delta_rule), REFERENCE, x, TOL))


def test_widest_heads():
    """K = V = 256, the widest heads the op accepts (not yet run on a GPU: the kernels' 256-wide key tiles)."""
    x = make_inputs(1, 1000, 1, 2, 256, 256, seed=6)
    print(compare_with_reference(op(chunk_gated_delta_rule), REFERENCE, x, TOL))


@pytest.mark.parametrize("T, H, HV", [(2048, 2, 4), (16384, 1, 2)])
def test_long(T, H, HV):
    """One sequence, grouped value heads; at 16k the default splits it into segments scanned in parallel (the
    float64 loop's autograd graph keeps ~1.5 MB per token here: two value heads)."""
    print(compare_with_reference(op(chunk_gated_delta_rule), REFERENCE, make_inputs(1, T, H, HV, 128, 128, seed=T),
                                 TOL))


def test_varlen():
    docs = [1, 63, 64, 65, 3000, 7, 4900, 130]
    x = make_inputs(1, sum(docs), 2, 2, 128, 128, seed=1, docs=docs)
    print(compare_with_reference(op(chunk_gated_delta_rule), REFERENCE, x, TOL))


@pytest.mark.parametrize("segment_chunks", [1, 3])
def test_many_segments(segment_chunks):
    """Segments of 1 and 3 chunks over 4k tokens and packed documents: the summaries and their fold dominate."""
    docs = [500, 1, 2000, 1595]
    x = make_inputs(1, sum(docs), 1, 2, 128, 128, seed=2 + segment_chunks, docs=docs)
    print(compare_with_reference(op(segmented(segment_chunks)), REFERENCE, x, TOL))


@pytest.mark.parametrize("segment_chunks, dtype, tol", [(None, torch.float32, 5e-3), (4, torch.float32, 5e-3),
                                                         (None, torch.bfloat16, TOL)])
def test_context_parallel_entry_call(segment_chunks, dtype, tol):
    """The call a context-parallel rank makes (tests/gpu/test_context_parallel_gpu.py, float32 model, rank 1 of 2):
    values [v | 0] (V + K = 8 + 16 columns), K = 16, grouped heads 2 -> 4, float32, packed documents of 1452, 1,
    595 and 2048 tokens (the first carried in from rank 0), an initial state and a final-state cotangent. With
    16-wide tiles this call's backward read shared memory out of bounds on Hopper (the illegal access of the
    context-parallel runs) and the bf16 forward returned NaN: chunk.MIN_TILE. float32 inputs multiply in TF32
    (errors ~2e-3 against float64 on an H100), hence 5e-3."""
    docs = [1452, 1, 595, 2048]
    x = make_inputs(1, sum(docs), 2, 4, 16, 24, seed=7, docs=docs, dtype=dtype)
    fn = chunk_gated_delta_rule if segment_chunks is None else segmented(segment_chunks)
    print(compare_with_reference(op(fn), REFERENCE, x, tol))
