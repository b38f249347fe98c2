"""Reading documents and labelled examples from text, JSONL, CSV and ``datasets`` sources.

A source is a text file, a folder, a .jsonl/.json or .csv/.tsv file, a
``save_to_disk`` folder or a ``datasets`` hub name. Every problem with it raises
:class:`DataError` with a one-line message that says what to fix.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------------------- files


def _read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it or give a .txt/.md/.jsonl/.csv file") from None
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL bytes: a binary file under a text name
        raise DataError(f"{path} holds NUL bytes, so it is binary, not text; give a .txt/.md/.jsonl/.csv file")
    return text


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` per JSON line; a .json file holding one JSON array also works."""
    text = _read_file(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        for i, record in enumerate(records):
            yield f"{path} record {i + 1}", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({e.msg}); write one JSON object per line"
            ) from None
        yield f"{path} line {lineno}", record


def _csv_records(path: Path, needed: dict[str, str]) -> Iterator[tuple[str, dict]]:
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
                    raise DataError(
                        f"{path} has no column {name!r} (columns: {', '.join(columns)}); set {setting}"
                    )
            for row in reader:
                yield f"{path} row {reader.line_num}", row
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path} is not valid CSV near line {reader.line_num} ({e}); fix the file") from None


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
            raise DataError(
                f"{source} has no column {name!r} (columns: {', '.join(ds.column_names)}); set {setting}"
            )
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


def read_texts(source: str, *, text_field: str = "text", split: str = "train") -> list[str]:
    """Documents from ``source``, in file order; empty and whitespace-only documents skipped.

    ``source`` is a text file (one document), a folder (each .txt/.md file one
    document, .jsonl/.csv files read by their rules, recursively, sorted by path),
    a .jsonl/.json file (``text_field`` of each record), a .csv/.tsv file (column
    ``text_field``), a ``save_to_disk`` folder, or a ``datasets`` hub name.
    """
    _check_exists(source)
    path = Path(source)
    if not path.exists() or _is_saved_dataset(path):
        ds = _load_dataset(source, split, {text_field: "data.text_field"})
        docs = [_text(f"{source} row {i}", t) for i, t in enumerate(ds[text_field])]
    elif path.is_dir():
        docs = []
        for file in _folder_files(path):
            docs += _file_texts(file, text_field)
    else:
        docs = _file_texts(path, text_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {source}; give a source with non-empty documents")
    return docs


def _file_texts(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return [_text(w, _field(w, r, text_field, "data.text_field")) for w, r in _jsonl_records(path)]
    if suffix in CSV_SUFFIXES:
        return [_text(w, r[text_field]) for w, r in _csv_records(path, {text_field: "data.text_field"})]
    return [_read_file(path)]


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
        records = _jsonl_records(path)
    elif path.is_file() and path.suffix.lower() in CSV_SUFFIXES:
        records = _csv_records(path, needed)
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
