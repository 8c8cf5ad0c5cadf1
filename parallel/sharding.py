"""Each context-parallel rank's share of a micro-batch: rank r of R takes tokens [r T/R, (r + 1) T/R) of every row.

Documents are numbered and positioned over the whole rows first (the single-device layout), then cut: a document that
crosses a rank edge keeps its id and its positions on both sides (RoPE sees the same positions as on one device),
the rank's local cu_seqlens start a sequence at each row start and each document start, and ``continues[b]`` marks
rows whose first local token continues a document begun on an earlier rank (its state comes from that rank).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from lctrain.model.layout import TokenLayout, layout_from_cu_seqlens
from lctrain.parallel.context import ContextGroup


def shard_layout(cu_seqlens: torch.Tensor, rows: int, row_len: int, rank: int, size: int, group) -> TokenLayout:
    """The layout of rank ``rank``'s slice of a [rows, row_len] micro-batch with document offsets ``cu_seqlens``
    (over the flattened tokens), its ``context`` the rank's ContextGroup in ``group`` (None only to inspect it; a
    group of one rank has no context: its layout is the single-device one)."""
    if row_len % size:
        raise ValueError(f"the sequence length {row_len} must be divisible by the context-parallel size {size}")
    whole = layout_from_cu_seqlens(cu_seqlens, rows, row_len)
    n = row_len // size
    doc_ids = whole.doc_ids.view(rows, row_len)
    positions = whole.positions.view(rows, row_len)
    local_doc, local_pos = doc_ids[:, rank * n:(rank + 1) * n], positions[:, rank * n:(rank + 1) * n]
    starts = local_pos == 0
    starts[:, 0] = True  # a row's slice starts a local sequence, continued or not
    offsets = torch.nonzero(starts.reshape(-1)).view(-1)
    cu = torch.cat([offsets, offsets.new_tensor([rows * n])])
    context = None
    if size > 1:
        context = ContextGroup(group, rank, size, doc_ids[:, : rank * n].contiguous(), positions[:, : rank * n].contiguous())
    return TokenLayout(cu_seqlens=cu, positions=local_pos.reshape(-1), doc_ids=local_doc.reshape(-1), rows=rows,
                       row_len=n, continues=local_pos[:, 0] > 0, context=context)


def shard_for_context(batch, device: torch.device):
    """(input_ids, labels, layout) of this rank's slice of ``batch`` (input_ids, labels [B, T]; cu_seqlens over the
    flattened B x T tokens) in megatron-core's context-parallel group."""
    group = parallel_state.get_context_parallel_group()
    rank, size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
    rows, row_len = batch.input_ids.shape
    layout = shard_layout(batch.cu_seqlens.to(device), rows, row_len, rank, size, group)
    n = row_len // size
    ids = batch.input_ids[:, rank * n:(rank + 1) * n].to(device, non_blocking=True)
    labels = batch.labels[:, rank * n:(rank + 1) * n].to(device, non_blocking=True)
    return ids, labels, layout
