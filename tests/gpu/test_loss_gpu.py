"""The chunked cross-entropy on a GPU with bf16 hidden states and output weight (its three products on tensor cores,
logits and weight gradient in float32) against float64 cross-entropy of the same bf16 values: loss within 1e-4
relative, gradients within 1e-2 (||a - b|| / ||b||; the gradient of the logits is rounded to bf16 on purpose)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.model.loss import chunked_cross_entropy

pytestmark = pytest.mark.gpu


def test_bf16_chunked_loss_matches_float64():
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden_size, vocab = 5000, 512, 32003  # odd sizes: a short last chunk, 3 padding rows of the weight
    hidden = (torch.randn(tokens, hidden_size, device="cuda", generator=gen)).bfloat16().requires_grad_()
    weight = (0.05 * torch.randn(vocab + 3, hidden_size, device="cuda", generator=gen)).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    labels[::97] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, vocab_size=vocab, chunk_tokens=2048)
    (0.5 * loss).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64[:vocab].t(), labels, ignore_index=-100, reduction="sum")
    (0.5 * ref).backward()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    errors = {"loss": abs(loss.item() - ref.item()) / ref.item(), "hidden": rel(hidden.grad, h64.grad),
              "weight": rel(weight.grad, w64.grad)}
    print(errors)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert errors["loss"] <= 1e-4 and errors["hidden"] <= 1e-2 and errors["weight"] <= 1e-2, errors
