"""Running a mixer's recurrence over the tokens a rank holds, from the state the earlier ranks leave it.

A recurrent mixer describes its recurrence over the local tokens with a ``Recurrence`` object (see the protocol
below). Without context parallelism ``run_recurrence`` is one kernel call over the packed documents. With it, every
rank composes the affine boundary maps of the ranks before it (DESIGN.md: S_out(r) = M_r S_in(r) + E_r).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

State = Any  # a tensor [N, ...] or a tuple of them (GSA has two), float32, one entry per sequence


class Recurrence(Protocol):
    """A mixer's recurrence over one rank's packed tokens (inputs captured at construction)."""

    def run(self, initial_state: State | None, cu_seqlens: torch.Tensor, output_final_state: bool) -> tuple[torch.Tensor, State | None]:
        """The kernel: outputs [1, L, ...] and, if asked, the final state of every sequence of ``cu_seqlens``."""

    def transition(self, row_cu_seqlens: torch.Tensor) -> State:
        """M_r per row: the linear part of the map from a row's entering state to its leaving state, computed as if the
        row held one document (rows with a document start inside are masked to zero by the caller)."""

    def apply_transition(self, transition: State, state: State) -> State:
        """M(S) for per-row M and S."""

    def zero_state(self, num: int, device: torch.device) -> State:
        """A zero state for ``num`` sequences."""


def run_recurrence(rec: Recurrence, layout) -> torch.Tensor:
    """Outputs of the recurrence over the rank's tokens, its documents resetting the state."""
    if layout.context is None:
        return rec.run(None, layout.cu_seqlens, False)[0]
    return layout.context.scan(rec, layout)
