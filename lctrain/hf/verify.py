"""The export check: lctrain's model, in the checkpoint's own tensor-parallel layout (one gloo process per rank,
each holding its rank's shard), and the exported Hugging Face model compute logits for the same tokens in float32;
they must agree to ``TOLERANCE``.
"""
from __future__ import annotations

import os
import pathlib
import socket
import tempfile

import torch

from lctrain.config import ModelConfig

TOLERANCE = 1e-4


def sample_tokens(model: ModelConfig, rows: int = 2, length: int = 128, seed: int = 0) -> torch.Tensor:
    """[rows, L] random token ids; L a multiple of the Block-State block (whose blocks lctrain aligns to rows)."""
    if "B" in model.pattern:
        block = model.block_state.block_size
        length = -(-length // block) * block
    return torch.randint(0, model.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def _rank_logits(rank: int, size: int, port: int, model: ModelConfig, shards: list[dict], tokens: torch.Tensor,
                 out: str | None) -> torch.Tensor:
    from lctrain.model.hybrid import HybridModel, transformer_config
    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.parallel.groups import init_parallel, shutdown_parallel

    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                          LOCAL_RANK=str(rank))
    init_parallel(size, 1)
    torch.manual_seed(0)
    net = HybridModel(model, transformer_config(model, size, 1)).float().eval()
    missing, unexpected = net.load_state_dict(shards[rank], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model of its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    rows, length = tokens.shape
    layout = layout_from_cu_seqlens(torch.arange(rows + 1) * length, rows, length)
    logits = net.logits(tokens, layout).view(rows, length, -1)
    if size > 1:
        if rank == 0:
            torch.save(logits, out)
        shutdown_parallel()
    return logits


def _spawned(rank, size, port, model, shards, tokens, out):
    _rank_logits(rank, size, port, model, shards, tokens, out)


def lctrain_logits(model: ModelConfig, shards: list[dict[str, torch.Tensor]], tokens: torch.Tensor) -> torch.Tensor:
    """Logits [rows, L, vocab] of lctrain's model with the given per-rank parameters (padded vocabulary rows kept)."""
    size = len(shards)
    if size == 1:
        return _rank_logits(0, 1, 0, model, shards, tokens, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(pathlib.Path(tmp) / "logits.pt")
        torch.multiprocessing.spawn(_spawned, args=(size, port, model, shards, tokens, out), nprocs=size)
        return torch.load(out)


def hf_logits(folder: pathlib.Path, tokens: torch.Tensor, remote: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float32).eval()
    with torch.no_grad():
        return net(tokens, use_cache=False).logits.float()


def max_logit_difference(model: ModelConfig, shards: list[dict[str, torch.Tensor]], folder: pathlib.Path,
                         remote: bool) -> float:
    tokens = sample_tokens(model)
    theirs = hf_logits(folder, tokens, remote)
    ours = lctrain_logits(model, shards, tokens)
    if theirs.shape != ours.shape:
        raise ValueError(f"the exported model gives logits of shape {tuple(theirs.shape)}, lctrain's {tuple(ours.shape)}")
    return (theirs - ours).abs().max().item()
