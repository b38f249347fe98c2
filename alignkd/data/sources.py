"""Reading documents and labelled examples from text, JSONL, CSV and ``datasets`` sources.

A source is a text file, a folder, a .jsonl/.json or .csv/.tsv file, a
``save_to_disk`` folder or a ``datasets`` hub name. Every problem with it raises
:class:`DataError` with a one-line message that says what to fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignkd.data.files import csv_records, jsonl_records, text_pieces
from alignkd.errors import DataError
from alignkd.models.loading import looks_local

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
# A missing path ending in one of these is a typo'd file, never a hub name.
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES + (".parquet", ".arrow", ".gz")
# Files that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Split read from a `datasets` source given as the eval set (train sources read "train").
EVAL_SPLIT = "validation"


def _load_dataset(source: str, split: str, needed: dict[str, str]):
    """A ``datasets.Dataset`` from a save_to_disk folder or the hub, with the ``needed`` columns checked."""
    try:
        import datasets  # optional: only these sources need it
    except ImportError:
        where = "a saved datasets folder" if os.path.isdir(source) else "not a local file or folder"
        raise DataError(f"{source} is {where}; reading it needs the datasets package: pip install datasets") from None
    if os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source} has no split {split!r} (splits: {', '.join(ds)}); choose one of those")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # hub / network / config errors arrive as many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"could not load {source!r} as a local path or a datasets hub name ({first}); check the name"
            ) from e
    for name, setting in needed.items():
        if name not in ds.column_names:
            raise DataError(f"{source} has no column {name!r} (columns: {', '.join(ds.column_names)}); set {setting}")
    return ds


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS)


def _folder_files(folder: Path) -> list[Path]:
    """Every readable file under ``folder``, recursively, sorted by path; hidden files skipped."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _check_exists(source: str) -> None:
    # A missing hub-looking name goes on to `datasets`; anything else is a typo'd path.
    if not os.path.exists(source) and looks_local(source, FILE_SUFFIXES):
        raise DataError(f"data file not found: {source}")


def _field(where: str, record: Any, name: str, setting: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; write one object per record")
    if name not in record:
        raise DataError(f"{where} has no {name!r} field; set {setting}")
    return record[name]


def _text(where: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where} holds a {type(value).__name__} where text was expected; point data.text_field at a text field"
        )
    return value


# ----------------------------------------------------------------------------- text


def source_files(source: str) -> list[Path] | None:
    """The files :func:`read_texts` reads for ``source``, in order; None for a ``datasets`` source."""
    _check_exists(source)
    path = Path(source)
    if not path.exists() or _is_saved_dataset(path):
        return None
    return _folder_files(path) if path.is_dir() else [path]


def iter_pieces(source: str, *, text_field: str = "text", split: str = "train") -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` for the documents of ``source`` in order, read as they are consumed.

    A document is one piece, except a text file over ``WHOLE_TEXT_BYTES``, which
    comes in pieces (only the last ends it). Empty and whitespace-only documents
    are skipped; a source without text raises :class:`DataError` once read through.
    Sources as in :func:`read_texts`; a ``datasets`` source is read into memory first.
    """
    files = source_files(source)
    if files is None:
        ds = _load_dataset(source, split, {text_field: "data.text_field"})
        docs = (_text(f"{source} row {i}", t) for i, t in enumerate(ds[text_field]))
        pieces = ((d, True) for d in docs)
    else:
        pieces = (p for file in files for p in _file_pieces(file, text_field))
    found, first = False, True  # first: this piece starts a document
    for text, ends in pieces:
        # Only a one-piece document can be blank: every piece but the last holds text before its cut.
        if not (first and ends and not text.strip()):
            found = True
            yield text, ends
        first = ends
    if not found:
        raise DataError(f"no text found in {source}; give a source with non-empty documents")


def read_texts(source: str, *, text_field: str = "text", split: str = "train") -> list[str]:
    """Documents from ``source``, in file order; empty and whitespace-only documents skipped.

    ``source`` is a text file (one document), a folder (each .txt/.md file one
    document, .jsonl/.csv files read by their rules, recursively, sorted by path),
    a .jsonl/.json file (``text_field`` of each record), a .csv/.tsv file (column
    ``text_field``), a ``save_to_disk`` folder, or a ``datasets`` hub name.
    """
    docs, parts = [], []
    for text, ends in iter_pieces(source, text_field=text_field, split=split):
        parts.append(text)
        if ends:
            docs.append("".join(parts))
            parts = []
    return docs


def _file_pieces(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        for w, r in jsonl_records(path):
            yield _text(w, _field(w, r, text_field, "data.text_field")), True
    elif suffix in CSV_SUFFIXES:
        for w, r in csv_records(path, {text_field: "data.text_field"}):
            yield _text(w, r[text_field]), True
    else:
        pieces = text_pieces(path)
        piece = next(pieces)
        for following in pieces:
            yield piece, False
            piece = following
        yield piece, True


# ----------------------------------------------------------------------------- labelled


def _label(where: str, value: Any) -> int | str:
    """A raw label as an int (ints, integral floats, digit strings) or a stripped string."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        s = value.strip()
        try:
            return int(s)
        except ValueError:
            return s
    raise DataError(f"{where} has label {value!r}; labels must be class names or integer class ids")


def read_labelled_raw(
    source: str, text_field: str, label_field: str, split: str
) -> tuple[list[str], list[int | str], list[str] | None]:
    """Texts, raw labels, and the class names a ``datasets`` ClassLabel column carries (else None)."""
    _check_exists(source)
    path = Path(source)
    needed = {text_field: "data.text_field", label_field: "data.label_field"}
    names = None
    if not path.exists() or _is_saved_dataset(path):
        ds = _load_dataset(source, split, needed)
        names = getattr(ds.features[label_field], "names", None)
        records = ((f"{source} row {i}", r) for i, r in enumerate(ds))
    elif path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        records = jsonl_records(path)
    elif path.is_file() and path.suffix.lower() in CSV_SUFFIXES:
        records = csv_records(path, needed)
    else:
        raise DataError(
            f"{source} is not labelled data; give a .jsonl, .csv or datasets source with text and label fields"
        )
    texts, labels = [], []
    for where, record in records:
        text = _text(where, _field(where, record, text_field, "data.text_field"))
        label = _label(where, _field(where, record, label_field, "data.label_field"))
        if isinstance(label, int) and label < 0:
            raise DataError(
                f"{where} has label {label}; unlabelled rows (e.g. a test split) cannot be used, pick a labelled split"
            )
        if text.strip():
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DataError(f"no text found in {source}; give a source with non-empty documents")
    return texts, labels, names


def class_names(labels: list[int | str], source: str) -> list[str]:
    """Sorted class names for string labels; ``str(i)`` for i in 0..max for integer labels."""
    kinds = {type(x) for x in labels}
    if kinds == {int}:
        return [str(i) for i in range(max(labels) + 1)]
    if kinds == {str}:
        return sorted(set(labels))
    raise DataError(f"{source} mixes integer and text labels; use one kind for every row")


def class_ids(labels: list[int | str], names: list[str], source: str) -> list[int]:
    if all(isinstance(x, int) for x in labels):
        bad = [x for x in labels if x >= len(names)]
        if bad:
            raise DataError(f"{source} has label id {bad[0]} but only {len(names)} classes; fix the labels")
        return list(labels)
    index = {n: i for i, n in enumerate(names)}
    for x in labels:
        if str(x) not in index:
            raise DataError(f"{source} has label {x!r} not among the classes ({', '.join(names)}); fix the labels")
    return [index[str(x)] for x in labels]


def read_labelled(
    source: str, *, text_field: str = "text", label_field: str = "label", split: str = "train"
) -> tuple[list[str], list[int], list[str]]:
    """Texts, integer label ids and class names for classification.

    String labels map to ids in sorted order; integer labels (or digit strings,
    as CSV gives them) stay as they are, with names ``str(i)``. A ``datasets``
    ClassLabel column keeps its own names. Sources as in :func:`read_texts`,
    except plain text files and folders, which carry no labels.
    """
    texts, labels, names = read_labelled_raw(source, text_field, label_field, split)
    names = names or class_names(labels, source)
    return texts, class_ids(labels, names, source), names
