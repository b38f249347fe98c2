"""Reading one file incrementally: a text file whole or in pieces, JSONL line by line, CSV row by row.

Every problem raises :class:`DataError` naming the file (and line) and what to fix.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignkd.errors import DataError

# A text file up to this size is read and tokenised whole, one document, as always; a larger
# one is read in pieces of about TEXT_PIECE_CHARS, so its text is never all in memory.
WHOLE_TEXT_BYTES = 8 << 20
TEXT_PIECE_CHARS = 1 << 20


def read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if "\x00" in text:
        raise _has_nul(path)
    return text


def _not_utf8(path: Path) -> DataError:
    return DataError(f"{path} is not UTF-8 text; convert it or give a .txt/.md/.jsonl/.csv file")


def _has_nul(path: Path) -> DataError:
    # Valid UTF-8, but no text file holds NUL bytes: a binary file under a text name.
    return DataError(f"{path} holds NUL bytes, so it is binary, not text; give a .txt/.md/.jsonl/.csv file")


def _starts_with(path: Path, char: str) -> bool:
    """Whether the first non-whitespace character of ``path`` is ``char`` (reads only up to it)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[0] == char
    return False


def _decoded(path: Path, parts: Iterator[str]) -> Iterator[str]:
    """``parts`` of ``path`` as read, with a decoding error or a NUL byte turned into its DataError."""
    try:
        for part in parts:
            if "\x00" in part:
                raise _has_nul(path)
            yield part
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` per JSON line, reading line by line; a .json file holding one JSON array also works."""
    if path.suffix.lower() == ".json" and _starts_with(path, "["):
        try:  # one array: json reads it whole
            records = json.loads(read_file(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        for i, record in enumerate(records):
            yield f"{path} record {i + 1}", record
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(_decoded(path, f), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {lineno} is not valid JSON ({e.msg}); write one JSON object per line"
                ) from None
            yield f"{path} line {lineno}", record


def safe_cut(text: str, start: int = 1) -> int:
    """Index of the last single space between two non-space characters at or after ``start``; 0 when there is none.

    Pre-tokenizers keep a word's leading space with the word and never join
    two words (GPT-2, SmolLM2, Llama 3 and Qwen byte-level BPE; SentencePiece's
    Metaspace), so ``text[:i]`` then ``text[i:]`` give the ids ``text`` gives
    when cut just before such a space. A cut inside a whitespace run could
    split tokens like ``"\\n\\n"``; a tokenizer that merges across words (none of
    those) could differ at each cut.
    """
    i = len(text) - 1  # the last character has nothing after it: never a cut
    while (i := text.rfind(" ", max(start, 1), i)) > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
    return 0


def text_pieces(path: Path) -> Iterator[str]:
    """The text of ``path`` in order: whole when small, else in ~TEXT_PIECE_CHARS pieces cut by :func:`safe_cut`."""
    if path.stat().st_size <= WHOLE_TEXT_BYTES:
        yield read_file(path)
        return
    held = ""  # text read but not yet handed out: everything after the last cut
    with path.open(encoding="utf-8") as f:
        for chunk in _decoded(path, iter(lambda: f.read(TEXT_PIECE_CHARS), "")):
            seen = len(held)
            held += chunk
            cut = safe_cut(held, seen - 1)  # a space at the old end had nothing after it: try it again
            if cut:
                yield held[:cut]
                held = held[cut:]
    yield held


def csv_records(path: Path, needed: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, row)`` per CSV/TSV row after checking that the ``needed`` columns exist.

    ``needed`` maps column name -> the setting that names it, for the error message.
    """
    # Documents can be long; the stdlib's default cap is 128 KiB per field.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            if not columns:
                return
            for name, setting in needed.items():
                if name not in columns:
                    raise DataError(f"{path} has no column {name!r} (columns: {', '.join(columns)}); set {setting}")
            for row in reader:
                yield f"{path} row {reader.line_num}", row
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path} is not valid CSV near line {reader.line_num} ({e}); fix the file") from None
