"""Issue 9 on CPU: every ~1.3B config builds at a scaled-down width (same pattern, same options) and trains two
steps; the end-to-end throughput benchmark runs in its tiny dry mode and prints its table."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lctrain.config import load_config
from lctrain.model.hybrid import HybridModel, transformer_config
from lctrain.model.layout import layout_from_cu_seqlens

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import CONFIGS, TINY  # noqa: E402


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_two_steps_scaled_down(parallel_1, name, monkeypatch):
    # The kernels' torch paths: this checks the configs and the model, and the Triton interpreter would take minutes
    # per config on CPU (the kernels are tested against their references in their own files).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    full = load_config(ROOT / "configs" / f"{name}.yaml")
    config = load_config(ROOT / "configs" / f"{name}.yaml", TINY + ["data.seq_len=64"], validate=True)
    assert config.model.pattern == full.model.pattern
    torch.manual_seed(0)
    model = HybridModel(config.model, transformer_config(config.model))
    model.set_checkpointing(config.train)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, config.model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    layout = layout_from_cu_seqlens(torch.tensor([0, 40, 64]), 1, 64)
    losses = []
    for _ in range(2):
        loss, count = model(ids, layout, torch.roll(ids, -1, 1), config.train.loss_chunk_tokens)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss / count).item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses


def test_full_size_configs_are_about_1p3b_parameters(parallel_1):
    """Every ~1.3B config, built full size on the meta device (no memory, well under a second), holds 1.2-1.45 B
    parameters; the FLOPs model behind the reported TFLOP/s and MFU agrees with that count: forward FLOPs per token
    at a vanishing attention span are ~2 per matmul weight (the embedding is a lookup, not a matmul)."""
    from lctrain.train.flops import forward_flops_per_token

    for name in CONFIGS:
        config = load_config(ROOT / "configs" / f"{name}.yaml")
        with torch.device("meta"):
            model = HybridModel(config.model, transformer_config(config.model))
        params = sum(p.numel() for p in model.parameters())
        assert 1.2e9 < params < 1.45e9, (name, params)
        from_flops = forward_flops_per_token(config.model, 1) / 2 + config.model.vocab_size * config.model.hidden_size
        assert abs(from_flops / params - 1) < 0.1, (name, params, from_flops)


@pytest.mark.slow
def test_throughput_benchmark_dry_run_prints_its_table():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--tiny",
                             "--config", "gdn_h1_1p3b", "--T", "64", "--steps", "1", "--warmup", "0"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0"})  # the script is checked, not the kernels
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "end-to-end training" in out and "gdn_h1_1p3b" in out and "breakdown:" in out
    assert "fla GDN 1.39B" in out and "peer needs CUDA" in out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["gdn_h1_1p3b", "64"])  # the table row
    assert float(row.split()[2]) > 0  # tokens/s measured
