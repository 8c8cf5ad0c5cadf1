"""The Block-State Transformer's in-block self-attention: the flex path (block-sparse mask, the CUDA path) and the
per-block masked SDPA path (the CPU path) both equal a dense float64 reference over the whole row, for packed
documents that cross block boundaries. flex_attention compiles for the CPU here (forward only: it has no CPU
backward); the model itself takes the SDPA path on CPU. On a GPU (marked ``gpu``): the flex path in bf16, values
and gradients, against the SDPA path in float64 at the bst_1p3b layer's width (16 heads x 128, blocks of 512)."""
import pytest
import torch

from kernel_checks import compare_with_reference
from lctrain.model.attention import flex_block_mask
from lctrain.model.block_state import in_block_attention
from lctrain.model.layout import layout_from_cu_seqlens


def dense_in_block_reference(q, k, v, layout, block):
    """Softmax over a whole row's keys with a [row_len, row_len] mask: same document, causal, same W-token block."""
    rows, n, _, dim = q.shape
    doc, pos = layout.doc_ids.view(rows, n), layout.positions.view(rows, n)
    index = torch.arange(n)
    visible = ((doc[:, :, None] == doc[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
               & (index[:, None] // block == index[None, :] // block))
    scores = torch.einsum("rqhd,rkhd->rhqk", q.double(), k.double()) * dim ** -0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("rhqk,rkhd->rqhd", torch.softmax(scores, -1), v.double()).to(q.dtype)


def test_in_block_attention_flex_and_sdpa_match_dense_reference():
    # Blocks of 64 (not a multiple of flex's 128-token tiles), rows of 320 (5 blocks; flex pads them to 384).
    # Row 0: documents of 50, 150 (crossing the block edges at 64, 128 and 192) and 120 tokens; row 1: 80 and 240.
    block, rows, n, heads, dim = 64, 2, 320, 2, 16
    layout = layout_from_cu_seqlens(torch.tensor([0, 50, 200, 320, 400, 640]), rows=rows, row_len=n)
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, n, heads, dim) for _ in range(3))
    reference = dense_in_block_reference(q, k, v, layout, block)
    sdpa = in_block_attention(q, k, v, layout, block, flex=False)
    flex = in_block_attention(q, k, v, layout, block, flex=True)
    assert sdpa.shape == flex.shape == q.shape
    torch.testing.assert_close(sdpa, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex, reference, rtol=1e-5, atol=1e-5)
    assert list(layout.cache) == [("flex_mask_in_blocks", block)]  # the mask is built once per layout and block


def test_flex_block_mask_rejects_keys_other_than_the_queries():
    doc, pos = torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None]
    with pytest.raises(ValueError, match="block=4"):
        flex_block_mask(doc, pos, torch.zeros(1, 12, dtype=torch.long), torch.arange(12)[None], None, block=4)


@pytest.mark.gpu
def test_in_block_attention_flex_on_gpu_matches_sdpa_in_float64():
    block, n, heads, dim = 512, 16384, 16, 128
    # documents of 700 (crossing the edge at 512), 3000, 1 (alone in its block's middle) and the rest
    layout = layout_from_cu_seqlens(torch.tensor([0, 700, 3700, 3701, n]), rows=1, row_len=n).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {name: torch.randn(1, n, heads, dim, generator=gen, device="cuda").to(torch.bfloat16) for name in "qkv"}
    errors = compare_with_reference(lambda q, k, v: in_block_attention(q, k, v, layout, block, flex=True),
                                    lambda q, k, v: in_block_attention(q, k, v, layout, block, flex=False),
                                    inputs, 1e-2)
    print(errors)
