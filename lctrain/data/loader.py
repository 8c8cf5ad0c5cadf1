"""Packing documents into fixed-length training sequences, sharded by data-parallel rank, resumable mid-epoch.

Epoch e: documents in the order of a permutation seeded by (seed, e) (identity without shuffle) are concatenated into
one stream s of N tokens (each document ends with EOS). Global sequence i of the epoch is s[i T : i T + T + 1]:
inputs s[i T + t], labels s[i T + t + 1], t < T. Consecutive sequences overlap by one token, so every token is a label
exactly once; only the last (N - 1) mod T tokens of the stream (and the sequences that do not fill a whole global
batch) are dropped at the epoch's end.

Global batch k holds sequences k P .. k P + P - 1, P = dp_size x micro_batch_size; sequence i goes to data-parallel
rank i mod dp_size. The loader's position is the number of global sequences consumed in the epoch, the same on every
rank, so a state saved on any rank restores every rank (also under another dp_size or micro_batch_size).

Recurrent mixers reset their state at each document start: the label of a document's last token (the next document's
first token) is IGNORE_INDEX, and cu_seqlens lists every document start over the flattened B x T tokens, with each
row start counted as one (a document cut by a row end continues as a new segment in the next row).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lctrain.data.shards import TokenDataset

IGNORE_INDEX = -100


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T]: next token, IGNORE_INDEX at each document's last token
    cu_seqlens: torch.Tensor  # int64 [segments + 1]: segment starts over the flattened B x T tokens, then B x T

    def num_tokens(self) -> int:
        """Tokens that carry a loss (labels != IGNORE_INDEX)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in dataclasses.astuple(self)))


class PackedLoader:
    """An endless iterator of this rank's Batches; `epoch` counts completed passes over the dataset."""

    def __init__(self, dataset: TokenDataset, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size = {dp_size})")
        self.dataset, self.seq_len, self.micro_batch_size = dataset, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.sequences_per_epoch = max(dataset.num_tokens - 1, 0) // seq_len
        self.global_batch_sequences = dp_size * micro_batch_size
        if self.sequences_per_epoch < self.global_batch_sequences:
            raise ValueError(
                f"the dataset holds {dataset.num_tokens} tokens, {self.sequences_per_epoch} sequences of seq_len "
                f"{seq_len}; one global batch needs dp_size x micro_batch_size = {self.global_batch_sequences}")
        self.epoch = 0
        self.position = 0  # global sequences consumed in this epoch
        self._plan_epoch: int | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sequences_per_epoch // self.global_batch_sequences

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        if self.position + self.global_batch_sequences > self.sequences_per_epoch:
            self.epoch += 1
            self.position = 0
        sequences = self.position + self.dp_rank + self.dp_size * np.arange(self.micro_batch_size, dtype=np.int64)
        batch = self._pack(sequences)
        self.position += self.global_batch_sequences
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "num_tokens": self.dataset.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a state_dict() of a loader over the same data, seq_len, seed and shuffle (dp_size and
        micro_batch_size may differ)."""
        mine = self.state_dict()
        for key in ("seq_len", "seed", "shuffle", "num_tokens"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}; "
                                 f"resuming would read different data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's document order and the start of each (and the end of the last) in the epoch stream."""
        if self._plan_epoch != self.epoch:
            count = self.dataset.num_documents
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(count)
            else:
                self._order = np.arange(count)
            lengths = self.dataset.document_lengths[self._order]
            self._stream_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._plan_epoch = self.epoch
        return self._order, self._stream_starts

    def _pack(self, sequences: np.ndarray) -> Batch:
        """Builds the batch of the given global sequence indices, vectorised over all documents they touch."""
        T, rows = self.seq_len, len(sequences)
        order, stream_starts = self._epoch_order()
        window_starts = sequences * T  # each row reads stream[window_start : window_start + T + 1]
        first = np.searchsorted(stream_starts, window_starts, side="right") - 1
        stop = np.searchsorted(stream_starts, window_starts + T + 1, side="left")  # documents first .. stop-1
        pieces = stop - first
        row = np.repeat(np.arange(rows), pieces)
        piece_index = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        document = first[row] + piece_index  # position in the epoch order
        # Offset of each piece within its row: the document start, or 0 for the piece that began before the row.
        offset = np.maximum(stream_starts[document] - window_starts[row], 0)
        length = np.minimum(stream_starts[document + 1] - window_starts[row], T + 1) - offset
        storage_start = self.dataset.document_starts[order[document]] + (window_starts[row] + offset
                                                                         - stream_starts[document])
        flat_start = row * (T + 1) + offset
        positions = np.repeat(storage_start - flat_start, length) + np.arange(rows * (T + 1))
        window = self.dataset.gather(positions).astype(np.int64).reshape(rows, T + 1)

        labels = window[:, 1:].copy()
        starts_inside = offset > 0  # a document starts here: the token before it ends a document
        labels[row[starts_inside], offset[starts_inside] - 1] = IGNORE_INDEX
        # Segment starts over the flattened inputs: each row start, and each document start before the row's end.
        segment = offset < T
        cu_seqlens = np.append(row[segment] * T + offset[segment], rows * T)
        return Batch(torch.from_numpy(np.ascontiguousarray(window[:, :-1])), torch.from_numpy(labels),
                     torch.from_numpy(cu_seqlens.astype(np.int64)))
