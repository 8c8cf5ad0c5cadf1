"""Where the documents are in the tokens one rank holds.

Every sublayer sees its input as one packed row x: [1, L, D], L = rows * row_len: the micro-batch's rows are laid end
to end, and row boundaries count as document boundaries. Recurrent mixers reset their state at each document start
(cu_seqlens), short convolutions and attention mask across documents (doc_ids), RoPE counts positions inside a document.

Under context parallelism each rank holds a contiguous slice of every row; ``positions`` are then positions in the
whole document, ``doc_ids`` are global document identities (equal on neighbouring ranks for a document that crosses
them), and ``continues[b]`` says that row b's first local token continues a document begun on an earlier rank.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lctrain.kernels.common import remember_host_offsets


@dataclasses.dataclass
class TokenLayout:
    cu_seqlens: torch.Tensor  # int64 [N + 1]: local document offsets over the L packed tokens
    positions: torch.Tensor  # int64 [L]: position of each token inside its document
    doc_ids: torch.Tensor  # int64 [L]: document identity of each token
    rows: int
    row_len: int
    continues: torch.Tensor | None = None  # bool [rows]; None outside context parallelism (nothing continues)
    context: Any = None  # lctrain.parallel.context.ContextGroup under context parallelism, else None
    cache: dict = dataclasses.field(default_factory=dict)  # per-forward objects shared by layers (attention masks)

    @property
    def num_tokens(self) -> int:
        return self.rows * self.row_len

    @property
    def cp_size(self) -> int:
        return 1 if self.context is None else self.context.size

    @property
    def row_first_sequence(self) -> torch.Tensor:
        """Index (into cu_seqlens' sequences) of each row's first local document: [rows]."""
        starts = torch.arange(self.rows, device=self.cu_seqlens.device) * self.row_len
        return torch.searchsorted(self.cu_seqlens, starts, right=True) - 1

    @property
    def row_last_sequence(self) -> torch.Tensor:
        """Index of each row's last local document: [rows]."""
        ends = (torch.arange(self.rows, device=self.cu_seqlens.device) + 1) * self.row_len
        return torch.searchsorted(self.cu_seqlens, ends, right=False) - 1

    def to(self, device) -> "TokenLayout":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("cu_seqlens", "positions", "doc_ids", "continues"):
            if moved[name] is not None:
                moved[name] = moved[name].to(device, non_blocking=True)
        if self.cu_seqlens is not None and self.cu_seqlens.device.type == "cpu":  # no copy back for kernel tables
            remember_host_offsets(moved["cu_seqlens"], self.cu_seqlens)
        moved["cache"] = {}
        return TokenLayout(**moved)


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, rows: int, row_len: int) -> TokenLayout:
    """The single-rank layout of a packed micro-batch whose document offsets (row boundaries included) are given."""
    total = rows * row_len
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to rows*row_len={total}, got {cu[0].item()}..{cu[-1].item()}")
    row_starts = torch.arange(0, total + 1, row_len, device=cu.device)
    cu = torch.unique(torch.cat([cu, row_starts]))  # rows always start documents
    index = torch.arange(total, device=cu.device)
    doc_ids = torch.searchsorted(cu, index, right=True) - 1
    positions = index - cu[doc_ids]
    return TokenLayout(cu_seqlens=cu, positions=positions, doc_ids=doc_ids, rows=rows, row_len=row_len)
