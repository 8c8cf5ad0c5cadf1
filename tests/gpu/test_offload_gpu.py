"""Block checkpointing with host offload (train.activation_checkpointing: block_offload) on a GPU: the same loss and
gradients as no checkpointing (float32: the side-stream copy out and the copy back must hand the recompute the exact
input), and a lower peak than block checkpointing, which keeps every sublayer's input on the GPU."""
from __future__ import annotations

import pytest
import torch

from lctrain.config import load_config
from lctrain.model.hybrid import HybridModel, transformer_config
from lctrain.model.layout import layout_from_cu_seqlens

pytestmark = pytest.mark.gpu


def _run(mode: str, pattern: str, tokens: int, hidden: int, dtype) -> tuple[torch.Tensor, dict, int]:
    config = load_config(None, [f"model.pattern={pattern}", f"model.hidden_size={hidden}", "model.vocab_size=512",
                                "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_k_dim=64",
                                "model.gated_deltanet.head_v_dim=64", "model.attention.num_heads=4",
                                "model.attention.window=256", f"data.seq_len={tokens}"])
    torch.manual_seed(0)
    model = HybridModel(config.model, transformer_config(config.model)).cuda().to(dtype).train()
    model.activation_checkpointing = mode
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 512, (1, tokens), device="cuda", generator=gen)
    layout = layout_from_cu_seqlens(torch.tensor([0, tokens // 3, tokens]), 1, tokens).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, count = model(ids, layout, ids.roll(-1, 1), loss_chunk_tokens=1024)
    (loss / count).backward()
    torch.cuda.synchronize()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, torch.cuda.max_memory_allocated() - before


def test_offload_matches_no_checkpointing(parallel_1):
    loss, grads, _ = _run("none", "G-W-", 2048, 256, torch.float32)
    loss_off, grads_off, _ = _run("block_offload", "G-W-", 2048, 256, torch.float32)
    torch.testing.assert_close(loss_off, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_off[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_offload_lowers_the_peak(parallel_1):
    """16 sublayers at 32k tokens x 1024 (bf16): block checkpointing keeps 16 x 64 MiB of inputs."""
    _, _, peak_block = _run("block", "G-" * 8, 32768, 1024, torch.bfloat16)
    _, _, peak_offload = _run("block_offload", "G-" * 8, 32768, 1024, torch.bfloat16)
    print(f"peak above the model: block {peak_block / 2**20:.0f} MiB, block_offload {peak_offload / 2**20:.0f} MiB")
    assert peak_offload < peak_block - 512 * 2**20
