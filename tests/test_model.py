"""The hybrid model's pieces on CPU: every pattern symbol builds and trains, attention and conv respect documents,
the chunked loss equals plain cross-entropy (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.config import TrainConfig, load_config
from lctrain.model.attention import blockwise_attention
from lctrain.model.hybrid import HybridModel, transformer_config
from lctrain.model.layout import layout_from_cu_seqlens
from lctrain.model.loss import chunked_cross_entropy
from lctrain.model.registry import LAYERS

TINY = ["model.hidden_size=32", "model.vocab_size=97", "model.attention.num_heads=2", "model.attention.window=8",
        "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_k_dim=16", "model.gated_deltanet.head_v_dim=16",
        "model.gated_slot_attention.num_heads=2", "model.gated_slot_attention.num_slots=8",
        "model.mamba2.head_dim=16", "model.mamba2.state_size=8", "model.block_state.block_size=8",
        "model.block_state.num_heads=2", "model.block_state.num_context_states=2", "model.block_state.ssm_state_size=4",
        "model.chunk_size=16", "data.seq_len=32"]


def tiny_model(pattern: str, *extra: str) -> HybridModel:
    config = load_config(None, TINY + [f"model.pattern={pattern}", *extra])
    torch.manual_seed(0)
    return HybridModel(config.model, transformer_config(config.model))


def packed_layout():
    # two rows of 32 tokens; row 0 holds documents of 5, 20 and 7 tokens, row 1 one document
    return layout_from_cu_seqlens(torch.tensor([0, 5, 25, 32, 64]), rows=2, row_len=32)


SYMBOL_CASES = [(s, []) for s in sorted(LAYERS)] + [
    ("B", ["model.block_state.variant=single_head"]), ("B", ["model.block_state.variant=multi_head"])]


@pytest.mark.parametrize("symbol, extra", SYMBOL_CASES)
def test_every_symbol_builds_trains_and_isolates_documents(parallel_1, symbol, extra, monkeypatch):
    if extra:
        # A variant changes the layer's wiring, not its kernels: it takes the kernels' torch paths (the interpreter
        # would add ~25 s each); the plain symbol runs the Triton kernels under the interpreter.
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model(symbol + "-", *extra)
    layout = packed_layout()
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 32))
    labels = torch.randint(0, 97, (2, 32))
    loss, count = model(ids, layout, labels, loss_chunk_tokens=16)
    assert count == 64 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    # A token of the second document changes nothing in the first document, nor anything before it.
    with torch.no_grad():
        base = model.logits(ids, layout)
        changed = ids.clone()
        changed[0, 10] = (changed[0, 10] + 1) % 97
        after = model.logits(changed, layout)
    # Exact for every mixer but the FFT convolution (BST's SSM), which is causal only up to float32 rounding
    # (~1e-7 here); a real leak shows at the scale of the changed token's own effect (~0.5).
    tolerance = 1e-5 if symbol == "B" else 0.0
    assert (base[:10] - after[:10]).abs().max() <= tolerance, "information leaked backwards or across documents"
    assert (base[10:25] - after[10:25]).abs().max() > 1e-2, "the changed token had no effect inside its document"
    assert (base[25:] - after[25:]).abs().max() <= tolerance, "information leaked into a later document"


def test_hybrid_pattern_loss_falls(parallel_1):
    model = tiny_model("G-W-*-")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    layout = packed_layout()
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    losses = []
    for _ in range(15):
        loss, count = model(ids, layout, labels)
        (loss / count).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss / count).item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("mode, skip", [("block", ""), ("block_offload", ""), ("block", "W"), ("block_offload", "W-")])
def test_activation_checkpointing_gives_the_same_gradients(parallel_1, mode, skip, monkeypatch):
    """Recomputing each sublayer in backward (its input kept on the device, or in host memory), except those of the
    skipped symbols, changes neither the loss nor any gradient (torch paths of the kernels: the interpreter adds
    nothing to this check); exactly the checkpointed sublayers run their forward twice."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in ("none", mode):
        model = tiny_model("G-W-S-").train()
        model.set_checkpointing(TrainConfig(activation_checkpointing=checkpointing, activation_checkpointing_skip=skip))
        calls = [0] * len(model.layers)
        for i, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        loss, count = model(ids, packed_layout(), labels, loss_chunk_tokens=16)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls == [1 if layer.symbol in skip else 2 for layer in model.layers], calls
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and all(g is not None for g in grads_ckpt.values())
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def dense_attention(q, k, v, doc, pos, window):
    """The reference: a materialised [L, L] mask (fine at test sizes)."""
    visible = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        visible &= pos[:, None] - pos[None, :] < window
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("window", [None, 1, 7, 100])
def test_blockwise_attention_matches_dense(window):
    layout = layout_from_cu_seqlens(torch.tensor([0, 1, 40, 41, 90, 200]), rows=1, row_len=200)
    q = torch.randn(1, 200, 4, 8, dtype=torch.float64)
    k, v = torch.randn(1, 200, 2, 8, dtype=torch.float64), torch.randn(1, 200, 2, 8, dtype=torch.float64)
    doc, pos = layout.doc_ids.view(1, -1), layout.positions.view(1, -1)
    out = blockwise_attention(q, k, v, doc, pos, doc, pos, window, 8 ** -0.5, block=32)
    ref = dense_attention(q[0], k[0], v[0], doc[0], pos[0], window)
    torch.testing.assert_close(out[0], ref)


def test_chunked_loss_matches_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)  # 37 real + 3 padding rows
    labels = torch.randint(0, 37, (50,))
    labels[[3, 17, 49]] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, vocab_size=37, chunk_tokens=7)
    (2.5 * loss).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2[:37].t(), labels, ignore_index=-100, reduction="sum")
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_short_conv_resets_at_documents(parallel_1):
    from lctrain.model.short_conv import ShortConv

    conv = ShortConv(6, 4, activation=False).double()
    layout = layout_from_cu_seqlens(torch.tensor([0, 2, 9, 20]), rows=1, row_len=20)
    x = torch.randn(1, 20, 6, dtype=torch.float64)
    y = conv(x, layout)
    ref = torch.zeros_like(x)
    for s, e in [(0, 2), (2, 9), (9, 20)]:
        seg = F.pad(x[0, s:e].t(), (3, 0))  # causal padding with zeros inside each document
        ref[0, s:e] = F.conv1d(seg[None], conv.weight[:, None, :], groups=6)[0].t()
    torch.testing.assert_close(y, ref)


def test_flex_attention_on_unaligned_lengths_matches_blockwise():
    """The flex path pads queries and keys to whole 128-token blocks (padding of a document no token has): its
    outputs equal the blockwise path for a context-parallel rank's shapes (a key halo before the queries, lengths not
    multiples of 128, documents crossing the halo edge, a sliding window). flex_attention compiles for the CPU here
    (forward only: it has no CPU backward); on GPUs it is the attention backend."""
    from lctrain.model.attention import blockwise_attention, flex_attention_documents, flex_block_mask

    torch.manual_seed(0)
    n, halo, heads, dim, window = 200, 63, 2, 16, 64
    q = torch.randn(1, n, heads, dim)
    k, v = torch.randn(1, halo + n, heads, dim), torch.randn(1, halo + n, heads, dim)
    k_pos = torch.arange(1000, 1000 + halo + n)[None]
    q_pos = k_pos[:, halo:]
    k_doc = torch.zeros_like(k_pos)
    k_doc[:, 30:] = 1  # a document starts inside the halo
    k_doc[:, halo + 150:] = 2  # and one inside the rank's tokens
    q_doc = k_doc[:, halo:]
    flex = flex_attention_documents(q, k, v, flex_block_mask(q_doc, q_pos, k_doc, k_pos, window), 0.25)
    blockwise = blockwise_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, window, 0.25)
    assert flex.shape == blockwise.shape == q.shape
    torch.testing.assert_close(flex, blockwise, rtol=1e-5, atol=1e-5)
