"""Where documents come from: the embedded default corpus and user text/JSONL files.

A document is one string. A text file is one document; a JSONL file holds one document per line, in its `text` field.
The default corpus is the running interpreter's standard library source, which every Python install carries: real
text, always present, no download.
"""
from __future__ import annotations

import json
import pathlib
import sys
import sysconfig
from collections.abc import Iterable, Iterator

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".rs", ".go", ".js", ".ts", ".java")
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES

# Folders of the standard library that are not library source: installed third-party packages and test suites (the
# test suites include deliberately malformed files, e.g. lib2to3/tests/data, and would dominate the corpus).
EXCLUDED_STDLIB_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[pathlib.Path]:
    """The .py files of this interpreter's standard library that decode as UTF-8, test suites excluded, sorted by path
    relative to the stdlib root (the same list on every call and every rank)."""
    root = stdlib_root()
    if not root.is_dir():
        raise ValueError(f"the default corpus needs the Python standard library source, but {root} is not a folder")
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_STDLIB_FOLDERS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(relative)
    if not files:
        raise ValueError(f"the default corpus is empty: no UTF-8 .py files under {root}")
    return [root / relative for relative in sorted(files, key=lambda p: p.as_posix())]


def default_corpus_description() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    return f"default corpus: Python {version} standard library source under {stdlib_root()}"


def resolve_inputs(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    """Checks every input and expands folders into their supported files (recursively, sorted).

    Raises ValueError naming the first missing path or unsupported file type."""
    files: list[pathlib.Path] = []
    for given in paths:
        path = pathlib.Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise ValueError(f"input folder {path} holds no supported files (allowed: {', '.join(SUPPORTED_SUFFIXES)})")
            files.extend(found)
        elif not path.exists():
            raise ValueError(f"input file {path} does not exist")
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"input file {path} has unsupported type {path.suffix or '(no extension)'!r}; "
                f"allowed: {', '.join(SUPPORTED_SUFFIXES)} (JSONL: one JSON object with a 'text' field per line)")
        else:
            files.append(path)
    if not files:
        raise ValueError("no input files given")
    return files


def read_documents(paths: Iterable[str | pathlib.Path], text_field: str = "text") -> Iterator[str]:
    """Yields the documents of the given files (and folders) in order: a text file is one document, a JSONL file one
    document per non-blank line (its `text_field`). Raises ValueError naming the file (and line) of bad input."""
    for path in resolve_inputs(paths):
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(path, text_field)
        else:
            yield _read_text(path)


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {error.start})") from None


def _read_jsonl(path: pathlib.Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a valid JSON line ({error.msg} at column {error.colno})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_number}: not valid UTF-8") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{line_number}: expected a JSON object with a {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_number}: field {text_field!r} must be a string, got {type(text).__name__}")
            yield text
