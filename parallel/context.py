"""What a rank of a context-parallel group needs from the ranks before it: entering states of recurrences, halos of
short convolutions and sliding-window attention, earlier keys of full attention. All differentiable.

A ``ContextGroup`` lives for one micro-batch (``lctrain.parallel.sharding.shard_for_context`` makes it): it knows the
process group and the document ids and positions of the tokens the earlier ranks hold (computed from the batch,
which every rank of the group has, so they need no communication).
"""
from __future__ import annotations

import torch

from lctrain.parallel.comm import all_gather, from_previous_rank
from lctrain.parallel.state_passing import Recurrence, boundary_map, carried_sequences, prefix_states


class ContextGroup:
    def __init__(self, group, rank: int, size: int, earlier_doc_ids: torch.Tensor, earlier_positions: torch.Tensor):
        """group: the context-parallel process group, in which this is rank ``rank`` of ``size``.
        earlier_doc_ids, earlier_positions: int64 [rows, rank x row_len], the tokens of ranks 0 .. rank - 1 in order
        (empty on rank 0); document ids are global (the same numbering as the rank's own)."""
        self.group, self.rank, self.size = group, rank, size
        self.earlier_doc_ids = earlier_doc_ids
        self.earlier_positions = earlier_positions

    def scan(self, rec: Recurrence, layout) -> torch.Tensor:
        """The recurrence's outputs over this rank's tokens as if the whole sequence ran on one device: one pass
        from zero (E, M, response), one all-gather of the (M, E) pairs, the prefix fold, the correction."""
        entry = rec.entry_pass(layout, carried_sequences(layout))
        transition, final = boundary_map(entry, layout)
        t_size = transition[0].numel()
        pairs = all_gather(torch.cat([transition.flatten(1), final.flatten(1)], 1), self.group)  # [R, rows, t + e]
        transitions = pairs[..., :t_size].reshape(self.size, *transition.shape)
        finals = pairs[..., t_size:].reshape(self.size, *final.shape)
        entering = prefix_states(transitions, finals, rec.apply_transition)[self.rank]
        return entry.outputs + entry.response(entering)

    def _earlier_tail(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Document ids and positions of the previous rank's last ``width`` tokens ([rows, width]; -1 / 0 on rank 0)."""
        if self.rank == 0:
            rows = self.earlier_doc_ids.shape[0]
            return (self.earlier_doc_ids.new_full((rows, width), -1), self.earlier_positions.new_zeros(rows, width))
        return self.earlier_doc_ids[:, -width:], self.earlier_positions[:, -width:]

    def previous_tail(self, x_rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous rank's last ``width`` tokens of x_rows [rows, n, C] (zeros on rank 0) and their document ids
        [rows, width] (-1 on rank 0, known from the batch), for a causal convolution's halo. The halo's gradient goes
        to the previous rank."""
        if width > x_rows.shape[1]:
            raise ValueError(f"a halo of {width} tokens needs at least {width} tokens per context-parallel rank, "
                             f"got {x_rows.shape[1]}; use fewer ranks or longer sequences")
        halo = from_previous_rank(x_rows[:, x_rows.shape[1] - width:], self.group)
        return halo, self._earlier_tail(width)[0]

    def earlier_keys(self, k: torch.Tensor, v: torch.Tensor, q_doc: torch.Tensor, q_pos: torch.Tensor,
                     window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values a rank's queries may see, earlier ranks' first: k, v [rows, n, H, D] -> (k_ext, v_ext
        [rows, m + n, H, D], k_doc, k_pos [rows, m + n]). Sliding window W: the previous rank's last W - 1 (m = W - 1,
        a halo); full attention (window None): those of all earlier ranks (m = rank x n, one all-gather)."""
        kv = torch.cat([k, v], -1)
        if window is None:
            gathered = all_gather(kv, self.group)[: self.rank]  # [rank, rows, n, H, 2D]
            earlier = gathered.transpose(0, 1).flatten(1, 2)
            k_doc, k_pos = self.earlier_doc_ids, self.earlier_positions
        else:
            width = window - 1
            if width == 0:
                return k, v, q_doc, q_pos
            earlier, k_doc = self.previous_tail(kv, width)
            k_pos = self._earlier_tail(width)[1]
        kv_ext = torch.cat([earlier, kv], 1)
        k_ext, v_ext = kv_ext.split([k.shape[-1], v.shape[-1]], -1)
        return k_ext, v_ext, torch.cat([k_doc, q_doc], 1), torch.cat([k_pos, q_pos], 1)
