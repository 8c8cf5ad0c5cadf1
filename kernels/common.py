"""Helpers every kernel folder shares: path dispatch, output allocation (with a poison mode for tests), varlen chunk maps."""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

_POISON = False
# Document offsets on the host, per offsets tensor (and its version): every layer of a step passes the same
# cu_seqlens, and each copy of a GPU tensor to the host waits for all the GPU's queued work, leaving the GPU idle
# while the host then launches the next kernels.
_HOST_OFFSETS = WeakIdKeyDictionary()


def use_triton(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under the interpreter (TRITON_INTERPRET=1)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def poisoned_outputs():
    """While active, kernel outputs start as NaN, so an element a kernel forgets to write fails every check."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. Kernels call this instead of torch.empty so tests can poison outputs."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def sequence_count(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    return batch if cu_seqlens is None else cu_seqlens.numel() - 1


def host_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens as int64 on the host: copied from the GPU once per tensor and version (or given by
    ``remember_host_offsets``), so that the layers of a step do not each synchronise with the GPU."""
    if cu_seqlens.device.type == "cpu":
        return cu_seqlens.to(torch.int64)
    entry = _HOST_OFFSETS.get(cu_seqlens)
    if entry is None or entry[0] != cu_seqlens._version:
        entry = (cu_seqlens._version, cu_seqlens.to("cpu", torch.int64))
        _HOST_OFFSETS[cu_seqlens] = entry
    return entry[1]


def remember_host_offsets(device_offsets: torch.Tensor, host: torch.Tensor) -> None:
    """Record the host copy a device tensor was made from (no copy back is then ever needed)."""
    if device_offsets.device.type != "cpu":
        _HOST_OFFSETS[device_offsets] = (device_offsets._version, host.to(torch.int64, copy=True))


def device_table(table: torch.Tensor, device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A table built on the host, on ``device`` without a synchronisation: a copy from pageable host memory waits
    for the GPU's queued work, one staged through pinned memory does not."""
    table = table.to(dtype).contiguous()
    if torch.device(device).type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> None:
    """Packed documents come as B = 1 and int64 offsets 0 = c_0 <= c_1 <= ... <= c_N = T."""
    if cu_seqlens is None:
        return
    if batch != 1:
        raise ValueError(f"cu_seqlens packs documents along one row: batch must be 1, got {batch}")
    if cu_seqlens.dtype not in (torch.int64, torch.int32) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of N + 1 offsets, N >= 1")
    offsets = host_offsets(cu_seqlens)
    if offsets[0] != 0 or offsets[-1] != length or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to T={length}; got {offsets.tolist()}")


def chunk_map(cu_seqlens: torch.Tensor | None, batch: int, length: int, chunk: int) -> torch.Tensor:
    """One row per chunk program: (sequence index, start token in the flattened [B*T] row, chunk index in sequence).

    Without cu_seqlens every batch row is one sequence of ``length`` tokens. The last chunk of a sequence may be
    partial; kernels mask it with the sequence end. Returned as int32 [num_chunks, 3] on the offsets' device.
    """
    if cu_seqlens is None:
        starts = torch.arange(batch, dtype=torch.int64) * length
        ends = starts + length
    else:
        offsets = host_offsets(cu_seqlens)
        starts, ends = offsets[:-1], offsets[1:]
    chunks_per_seq = (ends - starts + chunk - 1) // chunk
    seq = torch.repeat_interleave(torch.arange(starts.numel()), chunks_per_seq)
    first_chunk = torch.cumsum(chunks_per_seq, 0) - chunks_per_seq
    index_in_seq = torch.arange(seq.numel()) - first_chunk[seq]
    rows = torch.stack([seq, starts[seq] + index_in_seq * chunk, index_in_seq], dim=1)
    return device_table(rows, cu_seqlens.device if cu_seqlens is not None else "cpu")
