"""Running a mixer's recurrence over the tokens a rank holds, from the state the earlier ranks leave it.

A recurrent mixer describes its recurrence over the local tokens with a ``Recurrence`` object (see the protocol
below). Without context parallelism ``run_recurrence`` is one kernel call over the packed documents. With it
(README.md, "Context and tensor parallelism"), the state leaving a rank is affine in the state entering it,

    S_out(r) = M_r(S_in(r)) + E_r,

and so are the outputs: o = o_zero + R(S_in). Each rank makes ONE pass over its tokens from zero that also yields M_r
and the response R (``Recurrence.entry_pass``), all-gathers the pairs (M_r, E_r) (one collective per recurrence,
O(state) bytes), folds those of the ranks before it into S_in(r) (``prefix_states``) and adds R(S_in(r)) to its
outputs. Autograd carries the gradients back through the correction, the fold and the gather to every rank's pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import torch

State = torch.Tensor  # one state per sequence (or row) along dim 0, float32


@dataclasses.dataclass
class EntryPass:
    """A rank's pass over its tokens with every document starting from a zero state."""

    outputs: torch.Tensor  # [1, L, ...]
    final: State  # [N, ...]: each local sequence's final state (E)
    transition: torch.Tensor  # [N, ...]: for each carried sequence, the linear map M from its initial to final state
    response: Callable[[State], torch.Tensor]  # entering states [rows, ...] -> change of the outputs [1, L, ...]


class Recurrence(Protocol):
    """A mixer's recurrence over one rank's packed tokens (inputs captured at construction)."""

    def run(self, initial_state: State | None, cu_seqlens: torch.Tensor, output_final_state: bool) -> tuple[torch.Tensor, State | None]:
        """The kernel: outputs [1, L, ...] and, if asked, the final state of every sequence of ``cu_seqlens``."""

    def entry_pass(self, layout, carried: torch.Tensor) -> EntryPass:
        """One pass over ``layout``'s sequences from zero states, plus, for the sequences flagged in ``carried``
        (bool [N]: each is the first of a row and continues a document of an earlier rank), the linear maps M from
        their initial state to their final state and the response of their outputs to their initial state. The
        response takes one entering state per row of the layout and is zero outside carried sequences."""

    def apply_transition(self, transition: torch.Tensor, state: State) -> State:
        """M(S) for per-row M and S (float32)."""


class ChainedRecurrence(Protocol):
    """Recurrences joined by a nonlinearity (GSA: key pass, softmax over slots, value pass). The states still depend
    only on the inputs, so each stage is affine in its entering state: under context parallelism every stage is
    scanned in turn (one all-gather each); without it ``run`` may fuse them into one kernel."""

    def run(self, initial_state, cu_seqlens: torch.Tensor, output_final_state: bool) -> tuple[torch.Tensor, Any]:
        """The fused kernel over the rank's sequences."""

    def stages(self, scan: Callable[[Recurrence], torch.Tensor]) -> torch.Tensor:
        """The outputs, computing each stage's outputs as ``scan(stage)``."""


def run_recurrence(rec: Recurrence | ChainedRecurrence, layout) -> torch.Tensor:
    """Outputs of the recurrence over the rank's tokens, its documents resetting the state."""
    if layout.context is None:
        return rec.run(None, layout.cu_seqlens, False)[0]
    if hasattr(rec, "stages"):
        return rec.stages(lambda stage: layout.context.scan(stage, layout))
    return layout.context.scan(rec, layout)


def carried_sequences(layout) -> torch.Tensor:
    """bool [N]: the local sequences that start from an entering state (the first of each continuing row)."""
    carried = torch.zeros(layout.cu_seqlens.numel() - 1, dtype=torch.bool, device=layout.cu_seqlens.device)
    return carried.scatter(0, layout.row_first_sequence, layout.continues)  # rows never share a sequence


def boundary_map(entry: EntryPass, layout) -> tuple[torch.Tensor, State]:
    """Each row's (M, E) in float32: E is the final state of its last sequence from zero; M is that sequence's
    transition if it is also the row's first and continues an earlier rank's document, else zero (the state leaving
    the row does not depend on the one entering it: the row starts a document, or one starts inside it)."""
    first, last = layout.row_first_sequence, layout.row_last_sequence
    passes_through = (layout.continues & (first == last)).view(-1, *[1] * (entry.transition.dim() - 1))
    return torch.where(passes_through, entry.transition[last].float(), 0.0), entry.final[last].float()


def prefix_states(transitions: torch.Tensor, finals: torch.Tensor, apply_transition) -> State:
    """The entering state of every rank: S_in(0) = 0, S_in(r + 1) = M_r(S_in(r)) + E_r, in float32.

    transitions, finals: [R, rows, ...] (all ranks' pairs). Returns [R, rows, ...]. Every rank computes all R states
    and keeps its own: the graph is the same on every rank, so each joins the gather's backward (rank 0 too).
    """
    states = [torch.zeros_like(finals[0], dtype=torch.float32)]
    for r in range(finals.shape[0] - 1):
        states.append(apply_transition(transitions[r].float(), states[-1]) + finals[r].float())
    return torch.stack(states)
