"""Token shards: documents tokenized once into flat memory-mapped files, read back without loading them into RAM.

Layout of a prepared folder:

    meta.json                   format, tokenizer (path, sha256, vocab size, special ids), dtype, per-split counts
    train-00000.bin ...         raw token ids of whole documents, each ending with EOS (dtype from meta.json)
    train-00000.docs.npy ...    int64 [documents + 1]: document start offsets within the shard (last = shard length)
    eval-00000.bin ...          the same for the eval split

A document never spans two shards. Shards are memory-mapped on open; only the per-document offsets live in RAM.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from lctrain.data.corpus import default_corpus_description, default_corpus_files, read_documents, resolve_inputs
from lctrain.data.tokenizer import Tokenizer

FORMAT = "lctrain-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 per shard
ENCODE_BATCH_CHARS = 16 << 20  # text handed to SentencePiece at once: bounds memory, keeps its threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds ids 0 .. vocab_size - 1."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_data(
    inputs: Sequence[str | os.PathLike] | None,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    eval_fraction: float = 0.01,
    eval_documents: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Tokenizes the documents of `inputs` (text/JSONL files or folders; None = the default corpus), appends EOS to
    each, and writes train and eval shards plus meta.json into `out_dir`. Returns the metadata written.

    Eval documents: `eval_documents` of them if given, else ceil(eval_fraction x documents), evenly spaced through the
    input order (so a sorted corpus contributes eval text from everywhere); the train split keeps the rest and must
    not be empty. Empty documents are skipped. `num_workers` SentencePiece threads encode (the result is the same for
    any count). All files are written into a temporary folder beside `out_dir` that is renamed at the end, so a crash
    leaves no partial `out_dir`; an existing non-empty `out_dir` is replaced only with overwrite=True.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction {eval_fraction} must be in [0, 1)")
    if eval_documents is not None and eval_documents < 0:
        raise ValueError(f"eval_documents {eval_documents} must be >= 0")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens {shard_tokens} must be >= 1")
    if num_workers < 1:
        raise ValueError(f"num_workers {num_workers} must be >= 1")
    out_dir = pathlib.Path(out_dir)
    _check_replaceable(out_dir, overwrite)
    if inputs is None:
        files, source = default_corpus_files(), [default_corpus_description()]
    else:
        files = resolve_inputs(inputs)
        source = [str(path.resolve()) for path in files]

    # A first pass counts (and validates) the documents, so the eval split can be spread evenly before any writing.
    total = sum(1 for text in read_documents(files) if text)
    num_eval = eval_documents if eval_documents is not None else math.ceil(total * eval_fraction)
    if num_eval >= total:
        raise ValueError(f"the input has {total} non-empty documents; the eval split would take {num_eval} of them "
                         f"and leave none for training (lower eval_fraction / eval_documents)")
    is_eval = np.zeros(total, dtype=bool)
    is_eval[(np.arange(num_eval) * 2 + 1) * total // (2 * max(num_eval, 1))] = True

    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writers = {split: _ShardWriter(staging, split, dtype, shard_tokens) for split in SPLITS}
        documents = (text for text in read_documents(files) if text)
        index = 0
        for batch in _batches(documents, ENCODE_BATCH_CHARS):
            for ids in tokenizer.encode_batch(batch, num_threads=num_workers):
                writers["eval" if is_eval[index] else "train"].add(ids, tokenizer.eos_id)
                index += 1
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {
                "model_path": str(tokenizer.model_path.resolve()),
                "sha256": tokenizer.sha256(),
                "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
                "pad_id": tokenizer.pad_id,
            },
            "dtype": dtype.name,
            "eos_appended": True,
            "inputs": source,
            "eval_fraction": eval_fraction,
            "eval_documents": eval_documents,
            "splits": {split: writer.finish() for split, writer in writers.items()},
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _commit(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def _check_replaceable(out_dir: pathlib.Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"data output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"data output {out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _commit(staging: pathlib.Path, out_dir: pathlib.Path, overwrite: bool) -> None:
    """Renames the finished staging folder to out_dir. A replaced folder is first renamed aside and deleted only after
    the new one is in place."""
    _check_replaceable(out_dir, overwrite)
    staging.chmod(0o755)  # mkdtemp makes it private
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    previous = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, previous / out_dir.name)
    os.rename(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


def _batches(texts: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends documents to `<split>-NNNNN.bin`, starting a new shard once the current one holds shard_tokens."""

    def __init__(self, folder: pathlib.Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._name = ""
        self._offsets: list[int] = []

    def add(self, ids: list[int], eos_id: int) -> None:
        if self._file is None:
            self._name = f"{self.split}-{len(self.shards):05d}"
            self._file = open(self.folder / f"{self._name}.bin", "wb")
            self._offsets = [0]
        tokens = np.empty(len(ids) + 1, dtype=self.dtype)
        tokens[:-1] = ids
        tokens[-1] = eos_id
        self._file.write(tokens.tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        if self._offsets[-1] >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        np.save(self.folder / f"{self._name}.docs.npy", np.asarray(self._offsets, dtype=np.int64))
        self.shards.append({"tokens": f"{self._name}.bin", "documents": f"{self._name}.docs.npy",
                            "num_tokens": self._offsets[-1], "num_documents": len(self._offsets) - 1})

    def finish(self) -> dict:
        if self._file is not None:
            self._close_shard()
        return {"num_documents": sum(s["num_documents"] for s in self.shards),
                "num_tokens": sum(s["num_tokens"] for s in self.shards),
                "shards": self.shards}


class TokenDataset:
    """Documents stored back to back in shards (token arrays, typically read-only memmaps).

    Storage order is shard order; `document_starts[d]` is where document d starts in that concatenated stream
    (int64 [num_documents + 1], the last entry = num_tokens). `meta` is the prepared folder's metadata (or {})."""

    def __init__(self, shards: Sequence[np.ndarray], shard_document_offsets: Sequence[np.ndarray],
                 meta: dict | None = None):
        if len(shards) != len(shard_document_offsets):
            raise ValueError(f"{len(shards)} shards but {len(shard_document_offsets)} document offset arrays")
        for shard, offsets in zip(shards, shard_document_offsets):
            if offsets[0] != 0 or offsets[-1] != len(shard) or np.any(np.diff(offsets) <= 0):
                raise ValueError("document offsets must rise strictly from 0 to the shard length")
        self.shards = list(shards)
        self.meta = meta or {}
        self.dtype = np.dtype(self.shards[0].dtype) if self.shards else np.dtype(np.uint16)
        shard_lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_lengths)]).astype(np.int64)
        self.document_starts = np.concatenate(
            [self.shard_starts[i] + np.asarray(offsets[:-1], dtype=np.int64)
             for i, offsets in enumerate(shard_document_offsets)] + [self.shard_starts[-1:]]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def num_documents(self) -> int:
        return len(self.document_starts) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.document_starts)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, index: int) -> np.ndarray:
        """The tokens of one document (ending with EOS), a view into its shard."""
        start, stop = self.document_starts[index], self.document_starts[index + 1]
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        base = self.shard_starts[shard]
        return self.shards[shard][start - base:stop - base]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """A copy of the concatenated token stream [start, stop)."""
        return self.gather(np.arange(start, stop, dtype=np.int64))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at the given stream positions (any shape), read shard by shard from the memmaps."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_tokens):
            raise IndexError(f"token positions must lie in [0, {self.num_tokens})")
        out = np.empty(positions.shape, dtype=self.dtype)
        if len(self.shards) == 1:
            out[...] = self.shards[0][positions]
            return out
        shard_of = np.searchsorted(self.shard_starts, positions, side="right") - 1
        for shard in np.unique(shard_of):
            selected = shard_of == shard
            out[selected] = self.shards[shard][positions[selected] - self.shard_starts[shard]]
        return out

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raises ValueError unless `tokenizer` is the one this data was prepared with (same model file hash)."""
        expected = self.meta.get("tokenizer", {}).get("sha256")
        if expected is not None and expected != tokenizer.sha256():
            raise ValueError(f"tokenizer {tokenizer.model_path} is not the one the data was prepared with "
                             f"({self.meta['tokenizer']['model_path']}); prepare the data again with it")


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(data_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{data_dir} is not a prepared data folder (no {META_FILE}; run `lctrain prepare-data`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not supported; "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def open_dataset(data_dir: str | os.PathLike, split: str = "train") -> TokenDataset:
    """Memory-maps one split of a folder written by prepare_data."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not known; allowed: {', '.join(SPLITS)}")
    data_dir = pathlib.Path(data_dir)
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    shards, offsets = [], []
    for shard in meta["splits"][split]["shards"]:
        path = data_dir / shard["tokens"]
        if not path.is_file() or path.stat().st_size != shard["num_tokens"] * dtype.itemsize:
            raise ValueError(f"{path} is missing or does not hold the {shard['num_tokens']} tokens meta.json records")
        shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["num_tokens"],)))
        offsets.append(np.load(data_dir / shard["documents"]))
    return TokenDataset(shards, offsets, meta)
