"""Context parallelism on CPU: sharding, the boundary-state fold, and (gloo, 2 and 4 processes) every mixer layer and
the hybrid model giving the single-process outputs and gradients within 1e-5 in float32.

The batch's documents cover the cases that matter: a document crossing every rank (ranks in the middle pass the state
through), documents that start inside a rank, one-token documents, a document ending exactly at a rank edge (the next
rank starts fresh), and ranks whose slice is a single document's end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lctrain.config import load_config
from lctrain.data.loader import IGNORE_INDEX, Batch
from lctrain.kernels.gated_delta import gated_delta_rule_reference
from lctrain.model import gated_deltanet
from lctrain.model.gated_deltanet import GatedDeltaRecurrence
from lctrain.model.layout import layout_from_cu_seqlens
from lctrain.parallel.sharding import shard_layout
from lctrain.parallel.state_passing import boundary_map, carried_sequences, prefix_states

ROWS, SEQ_LEN = 3, 48
# row 0: documents [0, 5), [5, 40), [40, 41), [41, 48); row 1: [0, 24), [24, 26), [26, 48); row 2: one document.
CU_SEQLENS = torch.tensor([0, 5, 40, 41, 48, 72, 74, 96, 144])
TINY = ["model.hidden_size=32", "model.vocab_size=97", "model.attention.num_heads=2", "model.attention.num_kv_heads=1",
        "model.attention.window=8", "model.gated_deltanet.num_heads=2", "model.gated_deltanet.num_value_heads=4",
        "model.gated_deltanet.head_k_dim=16", "model.gated_deltanet.head_v_dim=8",
        "model.gated_slot_attention.num_heads=2", "model.gated_slot_attention.num_slots=8", "model.mamba2.head_dim=16",
        "model.mamba2.state_size=8", "model.block_state.block_size=4", "model.block_state.num_heads=2",
        "model.block_state.num_context_states=2", "model.block_state.ssm_state_size=4", "model.chunk_size=4"]
TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ sharding, fold


@pytest.mark.parametrize("size", [2, 4])
def test_shard_layout_cuts_documents_and_keeps_global_ids_and_positions(size):
    whole = layout_from_cu_seqlens(CU_SEQLENS, ROWS, SEQ_LEN)
    doc, pos = whole.doc_ids.view(ROWS, SEQ_LEN), whole.positions.view(ROWS, SEQ_LEN)
    n = SEQ_LEN // size
    for rank in range(size):
        layout = shard_layout(CU_SEQLENS, ROWS, SEQ_LEN, rank, size, group=None)
        cols = slice(rank * n, (rank + 1) * n)
        assert (layout.rows, layout.row_len) == (ROWS, n)
        assert torch.equal(layout.doc_ids.view(ROWS, n), doc[:, cols])
        assert torch.equal(layout.positions.view(ROWS, n), pos[:, cols])
        assert layout.continues.tolist() == [bool(pos[b, rank * n] > 0) for b in range(ROWS)]
        # local sequences: one at every row-slice start and at every document start, nowhere else
        expected = [b * n + t for b in range(ROWS) for t in range(n) if t == 0 or pos[b, rank * n + t] == 0]
        assert layout.cu_seqlens.tolist() == expected + [ROWS * n]
        assert torch.equal(layout.context.earlier_doc_ids, doc[:, : rank * n])
        assert torch.equal(layout.context.earlier_positions, pos[:, : rank * n])
    # the specific cases the multi-process tests rely on
    last = shard_layout(CU_SEQLENS, ROWS, SEQ_LEN, size - 1, size, group=None)
    assert last.continues.tolist() == [True, size == 4, True]
    if size == 4:  # rank 1 passes row 0's document through and its slice of row 1 is a single document's end
        middle = shard_layout(CU_SEQLENS, ROWS, SEQ_LEN, 1, 4, group=None)
        assert middle.cu_seqlens.tolist() == [0, 12, 24, 36] and middle.continues.tolist() == [True] * 3
        assert shard_layout(CU_SEQLENS, ROWS, SEQ_LEN, 2, 4, group=None).continues.tolist() == [True, False, True]


def test_shard_layout_rejects_indivisible_lengths():
    with pytest.raises(ValueError, match="divisible by the context-parallel size 5"):
        shard_layout(CU_SEQLENS, ROWS, SEQ_LEN, 0, 5, group=None)


@pytest.mark.parametrize("size, width_limit", [(2, None), (4, 8)])
def test_entry_passes_and_fold_equal_the_sequential_recurrence(size, width_limit, monkeypatch):
    """Each segment's one pass from zero, its (M, E) and the prefix fold give the states and outputs of the gated
    delta rule run token by token over whole documents (float64 reference). A width limit below V + K takes the
    two-call path of wide heads (on the kernels' torch path: the interpreter's Triton path is the other case)."""
    if width_limit is not None:
        monkeypatch.setattr(gated_deltanet, "MAX_HEAD_DIM", width_limit)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    H, HV, K, V = 1, 2, 8, 4
    L = ROWS * SEQ_LEN
    q = torch.nn.functional.normalize(torch.randn(1, L, H, K), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, L, H, K), dim=-1)
    v = torch.randn(1, L, HV, V)
    g = -torch.rand(1, L, HV) * 0.2  # slow decay: the entering state matters far into a segment
    beta = torch.rand(1, L, HV)
    whole = layout_from_cu_seqlens(CU_SEQLENS, ROWS, SEQ_LEN)
    o_ref, _ = gated_delta_rule_reference(*(x.double() for x in (q, k, v, g, beta)), cu_seqlens=whole.cu_seqlens)
    n = SEQ_LEN // size

    def local(x, rank):
        return x.view(ROWS, SEQ_LEN, *x.shape[2:])[:, rank * n:(rank + 1) * n].reshape(1, ROWS * n, *x.shape[2:])

    pairs, entries, layouts = [], [], []
    for rank in range(size):
        layout = shard_layout(CU_SEQLENS, ROWS, SEQ_LEN, rank, size, group=None)
        rec = GatedDeltaRecurrence(*(local(x, rank) for x in (q, k, v, g, beta)))
        entry = rec.entry_pass(layout, carried_sequences(layout))
        pairs.append(boundary_map(entry, layout))
        entries.append(entry)
        layouts.append(layout)
    transitions, finals = (torch.stack(x) for x in zip(*pairs))
    entering = prefix_states(transitions, finals, GatedDeltaRecurrence.apply_transition)
    for rank in range(size):
        # the state entering each row of rank r: the reference run up to the rank's first column of that row
        for b in range(ROWS):
            start = b * SEQ_LEN + rank * n
            doc_start = int(whole.cu_seqlens[torch.searchsorted(whole.cu_seqlens, start, right=True) - 1])
            if doc_start == start:
                continue  # nothing enters: the row's slice starts a document
            span = torch.tensor([0, start - doc_start])
            _, state = gated_delta_rule_reference(*(x[:, doc_start:start].double() for x in (q, k, v, g, beta)),
                                                  output_final_state=True, cu_seqlens=span)
            assert torch.allclose(entering[rank, b].double(), state[0], atol=1e-5), (rank, b)
        o = entries[rank].outputs + entries[rank].response(entering[rank])
        assert torch.allclose(o.double(), local(o_ref, rank), atol=1e-5), rank


def test_prefix_states_is_the_sequential_composition():
    torch.manual_seed(0)
    transitions, finals = torch.randn(5, 3, 2, 4, 4), torch.randn(5, 3, 2, 4, 6)
    states = prefix_states(transitions, finals, torch.matmul)
    expected = torch.zeros(3, 2, 4, 6)
    for r in range(5):
        assert torch.allclose(states[r], expected, atol=1e-6)
        expected = transitions[r] @ expected + finals[r]


# ------------------------------------------------------------------------------------ multi-process equality


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Setting:
    """A multi-process equality check: batch geometry, config, device, precision and how errors are measured."""

    rows: int = ROWS
    seq_len: int = SEQ_LEN
    cu_seqlens: tuple[int, ...] = tuple(CU_SEQLENS.tolist())
    overrides: tuple[str, ...] = ()  # applied after TINY
    device: str = "cpu"
    dtype: str = "float32"
    tol: float = TOL
    metric: str = "max"  # "max": max |a - b| / max |b|;  "norm": ||a - b|| / ||b||
    tensor_parallel_size: int = 1  # the processes form tensor-parallel x context-parallel groups

    def config(self, *more: str):
        return load_config(None, TINY + [f"data.seq_len={self.seq_len}", *self.overrides, *more])

    def magnitude(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        return t.abs().max() if self.metric == "max" else t.norm()

    def error(self, actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
        """The metric's error relative to max(|expected|, scale)."""
        difference = self.magnitude(actual.double() - expected.double())
        return (difference / max(self.magnitude(expected).item(), scale)).item()


def _batch(setting: Setting) -> Batch:
    """Random tokens; labels random with IGNORE_INDEX at each document's last token."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (setting.rows, setting.seq_len), generator=generator)
    labels = torch.randint(0, 97, (setting.rows, setting.seq_len), generator=generator)
    cu = torch.tensor(setting.cu_seqlens)
    labels.view(-1)[cu[1:] - 1] = IGNORE_INDEX
    return Batch(ids, labels, cu)


def _close(setting: Setting, name: str, actual: torch.Tensor, expected: torch.Tensor, errors: list[str],
           scale: float = 0.0) -> None:
    err = setting.error(actual, expected, scale)
    if not err <= setting.tol:  # NaN fails too
        errors.append(f"{name}: error {err:.2e} ({setting.metric})")


def _sum_over(group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for t in tensors.values():
        dist.all_reduce(t, group=group)
    return tensors


def _summed_grads(setting: Setting, module, group) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each parameter's gradient summed over the ranks (in float32, so the test's own sum does not round to bf16),
    and the sum of the ranks' gradient magnitudes: the scale of the terms summed. Errors are taken relative to
    that scale when it is larger than the total's: a gradient summed over every token from terms of both signs
    (an SSM's decay and step parameters) cancels to a small total, while both runs round relative to the terms
    (on GPUs, TF32 or bf16 products: 2e-3..4.5e-2 of the cancelled totals in the first runs there)."""
    grads = {p: w.grad.to(torch.float32, copy=True) for p, w in module.named_parameters()}
    scales = _sum_over(group, {p: setting.magnitude(g).reshape(1) for p, g in grads.items()})
    return _sum_over(group, grads), {p: s.item() for p, s in scales.items()}


def _check_layer(setting: Setting, name, module, group, rank, size, errors):
    """Outputs, input gradients and parameter gradients of the mixer ``module`` (x [1, L, D], layout) -> [1, L, D]
    on this rank's slice against the single-process run of the whole batch."""
    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.model.short_conv import ShortConv

    device, dtype = torch.device(setting.device), getattr(torch, setting.dtype)
    module.to(device, dtype)
    rows, seq_len, cu = setting.rows, setting.seq_len, torch.tensor(setting.cu_seqlens, device=device)
    generator = torch.Generator().manual_seed(5)
    width = module.weight.shape[0] if isinstance(module, ShortConv) else module.config.hidden_size
    x = torch.randn(rows, seq_len, width, generator=generator).to(device, dtype)
    cotangent = torch.randn(rows, seq_len, width, generator=generator).to(device, dtype)
    n = seq_len // size
    cols = slice(rank * n, (rank + 1) * n)

    x_full = x.clone().requires_grad_()
    out_full = module(x_full.view(1, -1, width), layout_from_cu_seqlens(cu, rows, seq_len)).view(rows, seq_len, -1)
    (out_full * cotangent).sum().backward()
    grads_full = {p: w.grad.clone() for p, w in module.named_parameters()}
    module.zero_grad()

    x_local = x[:, cols].clone().requires_grad_()
    layout = shard_layout(cu, rows, seq_len, rank, size, group)
    out = module(x_local.reshape(1, -1, width), layout).view(rows, n, -1)
    (out * cotangent[:, cols]).sum().backward()
    grads, scales = _summed_grads(setting, module, group)
    module.zero_grad()

    _close(setting, f"{name} output", out.detach(), out_full[:, cols].detach(), errors)
    _close(setting, f"{name} input gradient", x_local.grad, x_full.grad[:, cols], errors)
    for p in grads_full:
        _close(setting, f"{name} gradient of {p}", grads[p], grads_full[p], errors, scales[p])


def _check_model(setting: Setting, pattern, group, errors):
    from lctrain.model.hybrid import HybridModel, transformer_config
    from lctrain.model.layout import layout_from_cu_seqlens
    from lctrain.parallel.sharding import shard_for_context

    device = torch.device(setting.device)
    config = setting.config(f"model.pattern={pattern}")
    torch.manual_seed(0)
    tconfig = transformer_config(config.model, setting.tensor_parallel_size)
    model = HybridModel(config.model, tconfig).to(device, getattr(torch, setting.dtype))
    batch = _batch(setting)
    layout_full = layout_from_cu_seqlens(batch.cu_seqlens, setting.rows, setting.seq_len).to(device)
    loss_full, count_full = model(batch.input_ids.to(device), layout_full, batch.labels.to(device), loss_chunk_tokens=40)
    loss_full.backward()
    grads_full = {p: w.grad.clone() for p, w in model.named_parameters()}
    model.zero_grad()

    ids, labels, layout = shard_for_context(batch, device)
    loss, count = model(ids, layout, labels, loss_chunk_tokens=40)
    loss.backward()
    grads, scales = _summed_grads(setting, model, group)
    totals = _sum_over(group, {"loss": loss.detach().clone(), "count": count.clone()})
    if int(totals["count"]) != int(count_full):
        errors.append(f"model {pattern}: {int(totals['count'])} labelled tokens over the ranks, {int(count_full)} in one")
    name = f"[{setting.dtype}, tp={setting.tensor_parallel_size}] model {pattern}"
    _close(setting, f"{name} loss", totals["loss"] / count_full, loss_full.detach() / count_full, errors)
    for p in grads_full:
        _close(setting, f"{name} gradient of {p}", grads[p], grads_full[p], errors, scales[p])


def _worker(rank: int, size: int, port: int, checks: list[tuple[list, Setting]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    on_cpu = all(setting.device == "cpu" for _, setting in checks)
    if on_cpu:  # kernels are defined for the interpreter if any case runs them (before triton loads them)
        os.environ["TRITON_INTERPRET"] = "1" if any(c[2] for cases, _ in checks for c in cases) else "0"
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from lctrain.model.hybrid import Sublayer, transformer_config
    from lctrain.model.registry import LAYERS
    from lctrain.model.short_conv import ShortConv
    from lctrain.parallel.groups import init_parallel, shutdown_parallel

    for kind in LAYERS.values():  # every sublayer's kernels defined now, before a case changes TRITON_INTERPRET
        kind.module_class()

    errors: list[str] = []
    bounds = contextlib.ExitStack()
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels' loads and stores checked, as in conftest
        from triton_bounds import checked_bounds

        bounds.enter_context(checked_bounds())
    try:
        for cases, setting in checks:
            tp = setting.tensor_parallel_size
            init_parallel(tp, size // tp)
            group, cp_rank = parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_rank()
            for case, overrides, interpreted in cases:
                if on_cpu:  # CPU tensors run the Triton kernels only under the interpreter, else the torch paths
                    os.environ["TRITON_INTERPRET"] = "1" if interpreted else "0"
                torch.manual_seed(0)
                name = f"[{setting.dtype}, tp={tp}] " + " ".join([case, *overrides])
                if case == "conv":
                    _check_layer(setting, name, ShortConv(24, 4), group, cp_rank, size // tp, errors)
                elif case.startswith("model:"):
                    _check_model(setting, case.split(":", 1)[1], group, errors)
                else:
                    config = setting.config("model.pattern=" + case, *overrides)
                    mixer = Sublayer(transformer_config(config.model, tp), config.model, case).mixer
                    _check_layer(setting, name, mixer, group, cp_rank, size // tp, errors)
    finally:
        bounds.close()
        shutdown_parallel()
    assert not errors, f"rank {rank} of {size}: " + "; ".join(errors)


def run_equality(size: int, checks: list[tuple[list, Setting]]) -> None:
    """Spawn ``size`` processes that run each (cases, setting) check. A case is (mixer symbol, "conv" or
    "model:PATTERN"; config overrides; on CPU whether the Triton kernels run, interpreted)."""
    mp.spawn(_worker, args=(size, _free_port(), checks), nprocs=size)


LAYER_CASES = [("conv", [], False), ("G", [], False), ("W", [], False), ("*", [], False), ("-", [], False),
               ("S", [], False), ("M", [], False), ("B", [], False),
               ("B", ["model.block_state.variant=single_head"], False),
               ("B", ["model.block_state.variant=multi_head"], False), ("model:GWS*MB-", [], False)]
TRITON_CASES = [("model:G-W-*-", [], True)]
TP_CASES = [("model:GWS*MB-", [], False)]


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4])
def test_layers_and_model_equal_single_process(size):
    """Every mixer and a model with all of them, on the kernels' torch paths; at 2 processes also a G-W-*- model on
    the gated delta rule's Triton kernels (interpreted: their initial- and final-state gradients are what the scan
    relies on; 4 interpreted processes sharing 2 cores would take minutes); at 4 also a model under tensor
    parallelism 2 x context parallelism 2 (each rank's gradients are of its tensor-parallel shard on both runs)."""
    checks = [(LAYER_CASES + (TRITON_CASES if size == 2 else []), Setting())]
    if size == 4:
        tp_config = ("model.attention.num_kv_heads=2", "model.mamba2.num_groups=2", "parallel.tensor_parallel_size=2")
        checks.append((TP_CASES, Setting(overrides=tp_config, tensor_parallel_size=2)))
    run_equality(size, checks)


# ------------------------------------------------------------------------------------------------------ training

TRAIN_CONFIG = """\
model:
  pattern: "G-W-*-"
  hidden_size: 32
  gated_deltanet: {{num_heads: 2, head_k_dim: 16, head_v_dim: 16}}
  attention: {{num_heads: 2, window: 8}}
  chunk_size: 16
tokenizer: {{vocab_size: 320, path: "{tokenizer}"}}
data: {{dataset_dir: "{data}", seq_len: 64, micro_batch_size: 2}}
train: {{steps: 10, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, eval_interval: 0, precision: fp32, loss_chunk_tokens: 48}}
deepspeed: {{zero_stage: 2}}
logging: {{log_interval: 1, tensorboard: false, progress_bar: false}}
checkpoint: {{interval: 0}}
"""


def prepare_tiny_run(folder) -> pathlib.Path:
    """A tokenizer and a prepared dataset of 400 short documents (many document boundaries per sequence) in
    ``folder``; returns the run config (TRAIN_CONFIG) pointing at them."""
    import random

    from lctrain.data.shards import prepare_data
    from lctrain.data.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)] + ["def", "return", "(", ")", ":", "=", "+"]
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(2, 50)))}) + "\n"
                            for _ in range(400)))
    tokenizer = Tokenizer(train_tokenizer([docs], folder / "tok", vocab_size=320, input_sentence_size=400))
    prepare_data([docs], tokenizer, folder / "data")
    config = folder / "tiny.yaml"
    config.write_text(TRAIN_CONFIG.format(tokenizer=tokenizer.model_path, data=folder / "data"))
    return config


def train_losses(config, run_dir, processes: int, overrides: list[str], env: dict) -> subprocess.Popen:
    """Start launch/train.py (torchrun for several processes) with ``overrides``; the caller waits on it."""
    script = str(ROOT / "launch" / "train.py")
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node", str(processes)]
    sets = sum((["--set", o] for o in [f"run_dir={run_dir}", *overrides]), [])
    return subprocess.Popen(launcher + [script, "--config", str(config), *sets], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def logged(runs: dict[str, tuple[subprocess.Popen, pathlib.Path]], key: str = "train/loss") -> dict[str, list[float]]:
    """Wait for each run; ``key`` (train/loss, train/grad_norm) of every logged step from its metrics.jsonl."""
    values = {}
    for name, (proc, run_dir) in runs.items():
        if proc.returncode is None:
            out, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"{name} run failed:\n{out[-4000:]}"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        values[name] = [r[key] for r in records if key in r]
    return values


@pytest.mark.slow
def test_training_with_context_parallel_size_2_matches_one_process(tmp_path):
    """launch/train.py with parallel.context_parallel_size=2 (two processes, ZeRO-2) against one process: the
    first step's loss within 1e-5 and ten steps' losses within 1e-4. The gradient norms (before clipping) agree too:
    Adam would hide a gradient off by a constant factor from the losses, not from the norms."""
    config = prepare_tiny_run(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # CPU tensors take the kernels' torch paths: the interpreter is too slow here
    runs = {"cp1": (train_losses(config, tmp_path / "cp1", 1, [], env), tmp_path / "cp1"),  # the runs share 2 cores
            "cp2": (train_losses(config, tmp_path / "cp2", 2, ["parallel.context_parallel_size=2"], env), tmp_path / "cp2")}
    losses, norms = logged(runs), logged(runs, "train/grad_norm")
    single, split = losses["cp1"], losses["cp2"]
    assert len(single) == len(split) == 10
    assert abs(single[0] - split[0]) <= 1e-5, (single[0], split[0])
    assert max(abs(a - b) for a, b in zip(single, split)) <= 1e-4, list(zip(single, split))
    assert split[-1] < split[0]  # it trains
    assert max(abs(a / b - 1) for a, b in zip(norms["cp1"], norms["cp2"])) <= 1e-4, list(zip(norms["cp1"], norms["cp2"]))


@pytest.mark.slow
def test_cp_scaling_benchmark_dry_run(tmp_path):
    """benchmarks/cp_scaling.py end to end on CPU (2 gloo ranks, tiny model): every phase runs, and the bytes a G or
    W layer moves between ranks do not grow with the tokens per rank."""
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cp_scaling.py"), "--dry-run", "--iters", "2",
                           "--max-tokens-per-gpu", "64", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    model, kernel, longest = results["model"], results["kernel"], results["longest"]
    assert [r["cp"] for r in model["rows"]] == [1, 2] and all(r["ms"] > 0 for r in model["rows"])
    assert model["rows"][0]["bytes_per_step"] == {} and model["rows"][1]["bytes_per_step"]["all_gather"] > 0
    for symbol in "GW":
        short, long = (r["bytes"] for r in model["layers"] if r["symbol"] == symbol)
        assert short == long and short, (symbol, short, long)
    assert [(r["impl"], r["cp"]) for r in kernel["rows"] if r["ms"] > 0] == [("lctrain", 1), ("lctrain", 2)]
    assert len(longest) == 1 and longest[0]["seq_len"] == 128
    assert "== model" in (tmp_path / "table.txt").read_text()
