"""Tensor parallelism on CPU (gloo): a model with every pattern symbol computes the same logits, loss and gradient
norm with its heads split over 2 ranks as on one rank (weights are drawn in full and sliced, so both are the same
model)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

PATTERN = "G-S-M-B-*-W-"
OVERRIDES = ["model.hidden_size=32", "model.vocab_size=97", "model.attention.num_heads=2", "model.attention.window=8",
             "model.attention.qk_norm=true", "model.attention.output_gate=true",
             "model.gated_deltanet.num_heads=2", "model.gated_deltanet.num_value_heads=4",
             "model.gated_deltanet.head_k_dim=8", "model.gated_deltanet.head_v_dim=8",
             "model.gated_slot_attention.num_heads=2", "model.gated_slot_attention.num_slots=4",
             "model.mamba2.head_dim=16", "model.mamba2.state_size=4", "model.mamba2.num_groups=2",
             "model.block_state.block_size=8", "model.block_state.num_heads=2", "model.block_state.num_context_states=2",
             "model.block_state.ssm_state_size=4", "model.chunk_size=16", "data.seq_len=32", f"model.pattern={PATTERN}",
             "model.tie_embeddings=false"]


def run(rank: int, world: int, port: int, out: dict, overrides: list[str]):
    os.environ.pop("TRITON_INTERPRET", None)  # the model's torch paths: kernels are tested on their own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from lctrain.config import load_config
    from lctrain.model.hybrid import HybridModel, transformer_config
    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.parallel.groups import init_parallel, shutdown_parallel

    init_parallel(tensor_parallel_size=world)
    config = load_config(None, overrides + [f"parallel.tensor_parallel_size={world}"])
    torch.manual_seed(0)
    model = HybridModel(config.model, transformer_config(config.model, tensor_parallel_size=world))
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    layout = layout_from_cu_seqlens(torch.tensor([0, 5, 25, 32, 64]), 2, 32)
    labels = torch.roll(ids, -1, 1)
    loss, count = model(ids, layout, labels)
    loss.backward()
    squares = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        sharded = getattr(p, "tensor_model_parallel", False)
        # sharded: each rank holds a slice; replicated: every rank holds the same full gradient (count it once)
        if sharded or rank == 0:
            squares += p.grad.double().pow(2).sum()
    dist.all_reduce(squares)
    logits = model.logits(ids, layout)
    if rank == 0:
        out["loss"], out["grad_norm"], out["logits"] = loss.item(), squares.sqrt().item(), logits
    shutdown_parallel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(world: int, overrides: list[str] = OVERRIDES) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(run, args=(world, free_port(), out, overrides), nprocs=world, join=True)
        return dict(out)


@pytest.mark.slow
def test_tensor_parallel_two_ranks_equal_one():
    one, two = results(1), results(2)
    # float32: the split only reorders sums (all-reduces of partial products)
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
    torch.testing.assert_close(two["logits"], one["logits"], rtol=1e-5, atol=1e-5)
    assert abs(one["grad_norm"] - two["grad_norm"]) <= 1e-5 * one["grad_norm"], (one["grad_norm"], two["grad_norm"])
