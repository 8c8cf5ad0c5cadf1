"""SentencePiece tokenizer: training (BPE or unigram, byte fallback) and a small encode/decode wrapper.

Options are chosen for source code and exact round trips: no normalisation (identity rule), whitespace kept as is (no
collapsing, no dummy prefix; runs of spaces may form one piece, so indentation is cheap), digits split one per piece,
and every character outside the vocabulary falls back to its UTF-8 bytes, so decode(encode(text)) == text for any
text. Training sentences are whole lines grouped into chunks, so newlines are ordinary characters the model can
merge (")\\n", ":\\n") instead of sentence separators.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from lctrain.data.corpus import read_documents, resolve_inputs

MODEL_TYPES = ("bpe", "unigram")
logger = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
BYTE_PIECES = 256


def train_tokenizer(
    files: Iterable[str | pathlib.Path],
    out_prefix: str | pathlib.Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_length: int = 4096,
    input_sentence_size: int = 1000,
    seed: int = 0,
    num_threads: int | None = None,
    character_coverage: float = 0.9999,
) -> pathlib.Path:
    """Trains a SentencePiece model on the documents of `files` (text or JSONL, see corpus.read_documents) and writes
    `<out_prefix>.model` and `<out_prefix>.vocab`; returns the .model path.

    Training sentences are chunks of whole lines of at most `max_sentence_length` UTF-8 bytes (longer lines are cut);
    `input_sentence_size` chunks are sampled from them (all when there are fewer), which bounds training time.
    Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then the byte pieces, then the learned pieces.
    The default sample (1000 chunks of <= 4 KiB) trains a 2048-piece BPE model in about a second and a unigram model
    in about 12 s on 2 cores; raise it for real corpora. The output is deterministic for a given input and seed.
    Each file is written to a temporary name and renamed, so a crash never leaves a partial file.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer model_type {model_type!r} is not supported; allowed: {', '.join(MODEL_TYPES)}")
    reserved = 4 + (BYTE_PIECES if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"tokenizer vocab_size {vocab_size} is too small; it must exceed {reserved} "
                         f"(4 special ids{' + 256 byte pieces' if byte_fallback else ''})")
    if max_sentence_length < 16:
        raise ValueError(f"tokenizer max_sentence_length {max_sentence_length} is too small; allowed: >= 16 bytes")
    if input_sentence_size <= 100:  # SentencePiece's own lower limit
        raise ValueError(f"tokenizer input_sentence_size {input_sentence_size} is too small; allowed: > 100")
    files = resolve_inputs(files)  # every input exists and has a supported type, before any work
    spm.set_random_generator_seed(seed)
    chunks = _RecordingIterator(_training_chunks(read_documents(files), max_sentence_length))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks,
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            # Small corpora cannot always fill the requested vocabulary; train the largest one they allow.
            hard_vocab_limit=False,
            num_threads=num_threads or max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError:
        if chunks.error is not None:  # SentencePiece wraps errors raised by the input in RuntimeError
            raise chunks.error from None
        raise
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if processor.vocab_size() < vocab_size:
        logger.warning("the training text allows only %d tokenizer pieces of the %d asked for; the tokenizer has %d",
                       processor.vocab_size(), vocab_size, processor.vocab_size())
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.vocab_size()))
    out_prefix = pathlib.Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    # The .model is written last: its presence means a complete pair.
    _write_atomically(out_prefix.with_name(out_prefix.name + ".vocab"), vocab.encode("utf-8"))
    _write_atomically(model_path, model.getvalue())
    return model_path


class _RecordingIterator:
    """Passes items through and keeps the exception that ended the iteration, if any."""

    def __init__(self, items: Iterator[str]):
        self._items = items
        self.error: Exception | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._items)
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            raise


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes a temporary file beside `path`, then renames it: readers see the old file or the whole new one."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)  # mkstemp creates it private; a tokenizer is meant to be shared
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def _training_chunks(documents: Iterator[str], max_bytes: int) -> Iterator[str]:
    """Groups each document's lines (newlines kept) into chunks of at most `max_bytes` UTF-8 bytes; a longer line is
    cut into pieces of max_bytes // 4 characters (a character takes at most 4 bytes)."""
    for document in documents:
        chunk: list[str] = []
        size = 0
        for line in document.splitlines(keepends=True):
            line_bytes = len(line.encode("utf-8"))
            if line_bytes > max_bytes:
                if chunk:
                    yield "".join(chunk)
                    chunk, size = [], 0
                step = max_bytes // 4
                yield from (line[i:i + step] for i in range(0, len(line), step))
                continue
            if size + line_bytes > max_bytes:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += line_bytes
        if chunk:
            yield "".join(chunk)


class Tokenizer:
    """A trained SentencePiece model. encode() adds no BOS/EOS; the data pipeline appends EOS to each document."""

    def __init__(self, model_path: str | pathlib.Path):
        self.model_path = pathlib.Path(model_path)
        if not self.model_path.is_file():
            raise ValueError(f"tokenizer model {self.model_path} does not exist (train one with `lctrain train-tokenizer`)")
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.load(str(self.model_path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"tokenizer model {self.model_path} is not a SentencePiece model ({error})") from None

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """encode() of each text, on `num_threads` SentencePiece threads (same result for any thread count)."""
        return self._processor.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def sha256(self) -> str:
        """Hash of the model file: identifies the tokenizer that produced a token dataset."""
        return hashlib.sha256(self.model_path.read_bytes()).hexdigest()

    def __getstate__(self) -> dict:
        return {"model_path": str(self.model_path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"
