"""Next-token cross-entropy over the vocabulary-parallel output layer, a chunk of tokens at a time.

Full logits for a 65k-token sequence and a 32k vocabulary would take 8 GiB in float32; here at most
``chunk_tokens x vocab/tp`` logits exist at once. The gradients with respect to the hidden states and the output
weight are formed in the same pass (the softmax is at hand then), kept, and scaled by the incoming gradient in
backward: no second pass over the logits. The three products per chunk (logits, and the gradients of the hidden
states and of the weight) run on the weight's dtype (bf16 tensor cores), the logits and the weight gradient
accumulated and kept in float32; the softmax works in place on the chunk's float32 logits.

With the vocabulary split over tensor-parallel ranks, the softmax normaliser, its max and the target logit are
reduced across the group (Megatron's vocab-parallel cross-entropy), and the hidden-state gradient is summed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE = -100


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


# torch.mm(a, b, out_dtype=float32): bf16/fp16 operands on tensor cores, the float32 accumulator written out unrounded.
_MM_TO_FLOAT32 = "dtype" in torch.ops.aten.mm.overloads()


def _matmul(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b in the accumulation dtype ``acc`` (float32 for half operands; float64 stays float64)."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and _MM_TO_FLOAT32:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start: int, vocab_size: int, chunk_tokens: int, group):
        """hidden [L, D]; weight [V_local, D] (this rank's vocabulary rows from vocab_start); labels [L] (-100: none).
        Rows at or past ``vocab_size`` are padding: excluded from the softmax. Returns the summed loss over labelled
        tokens (float32 scalar)."""
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        vocab_local = weight.shape[0]
        real_local = max(0, min(vocab_local, vocab_size - vocab_start))
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 inputs accumulate in float32
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        for s in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[s:s + chunk_tokens], labels[s:s + chunk_tokens]
            logits = _matmul(h, weight.t(), acc)  # [c, V_local]
            logits[:, real_local:] = float("-inf")
            top = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
            logits -= top[:, None]
            local_y = y - vocab_start
            mine = (local_y >= 0) & (local_y < vocab_local)
            rows = torch.arange(h.shape[0], device=h.device)
            target = torch.where(mine, logits[rows, local_y.clamp(0, vocab_local - 1)], 0.0)
            target = _all_reduce(target, group)
            exp = logits.exp_()  # in place: the chunk's one float32 [c, V_local] buffer
            sum_exp = _all_reduce(exp.sum(-1), group)
            valid = y != IGNORE
            loss += torch.where(valid, sum_exp.log() - target, 0.0).sum()
            if want_grad:
                # d loss / d logits = softmax - onehot(target), zero for unlabelled tokens; rounded to the weight's
                # dtype for the two products (tensor cores), as a bf16 output layer's own backward would.
                grad_logits = exp.mul_((valid / sum_exp)[:, None])
                grad_logits[rows[mine & valid], local_y[mine & valid]] -= 1.0
                grad_logits = grad_logits.to(weight.dtype)
                grad_hidden[s:s + chunk_tokens] = (grad_logits @ weight).to(hidden.dtype)
                grad_weight += _matmul(grad_logits.t(), h, acc)
        if want_grad:
            _all_reduce(grad_hidden, group)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None)


def chunked_cross_entropy(hidden, weight, labels, vocab_size: int, vocab_start: int = 0, chunk_tokens: int = 4096, group=None):
    """Sum over labelled tokens of -log softmax(hidden @ weight^T)[label]. See the module docstring."""
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, vocab_start, vocab_size, chunk_tokens, group)
