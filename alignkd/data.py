"""Text and labelled data -> tokenised tensors: packed LM blocks, padded classification batches.

Data flows one way: a source (text file, folder, JSONL, CSV, a saved or hub
``datasets`` dataset) -> documents -> token ids -> fixed-size tensors, plus a
resumable sampler that hands out example indices. Every problem with the input
raises :class:`DataError` with a one-line message that says what to fix.
"""

from __future__ import annotations

from alignkd.errors import DataError

import csv
import json
import os
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
# A missing path ending in one of these is a typo'd file, never a hub name.
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES + (".parquet", ".arrow", ".gz")
# Files that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Split read from a `datasets` source given as the eval set (train sources read "train").
EVAL_SPLIT = "validation"
# data.bos: auto (what the tokenizer does, see wants_bos), always, never.
BOS_SETTINGS = ("auto", "always", "never")


# ----------------------------------------------------------------------------- sources


def _is_local_path(source: str) -> bool:
    """True when a missing ``source`` must have been meant as a local path, not a hub name.

    Hub names are ``name`` or ``owner/name``, so on POSIX a single "/" is allowed;
    absolute paths, "./x", "~/x", "a/b/c", backslashes and file suffixes are not.
    """
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or source.lower().endswith(FILE_SUFFIXES)
    )


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it or give a .txt/.md/.jsonl/.csv file") from None


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
    if not os.path.exists(source) and _is_local_path(source):
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


def _read_labelled_raw(
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


def _label_names(labels: list[int | str], source: str) -> list[str]:
    """Sorted class names for string labels; ``str(i)`` for i in 0..max for integer labels."""
    kinds = {type(x) for x in labels}
    if kinds == {int}:
        return [str(i) for i in range(max(labels) + 1)]
    if kinds == {str}:
        return sorted(set(labels))
    raise DataError(f"{source} mixes integer and text labels; use one kind for every row")


def _label_ids(labels: list[int | str], names: list[str], source: str) -> list[int]:
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
    texts, labels, names = _read_labelled_raw(source, text_field, label_field, split)
    names = names or _label_names(labels, source)
    return texts, _label_ids(labels, names, source), names


# ----------------------------------------------------------------------------- tokens


def wants_bos(tokenizer) -> bool:
    """True when the tokenizer puts its BOS first in what it encodes, so its model expects one there.

    Decided from what the tokenizer does, not from a list of families: Llama,
    Gemma and Mistral tokenizers add ``<bos>``; GPT-2 and SmolLM2 ones have a BOS
    token but do not add it, and BERT-like ones have none.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("Hello world", add_special_tokens=True, verbose=False)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def resolve_bos(setting: str, tokenizer) -> int | None:
    """The BOS id each packed block starts with, or None, for ``data.bos`` = auto, always or never."""
    if setting == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if setting == "always":
        if bos is None:
            raise DataError("data.bos is always but the tokenizer has no BOS token; set data.bos to never or auto")
        return bos
    if setting != "auto":
        raise DataError(f"data.bos is {setting!r}; set it to one of {', '.join(BOS_SETTINGS)}")
    return bos if wants_bos(tokenizer) else None


def tokenize_texts(texts: list[str], tokenizer, *, batch: int = 1000) -> list[list[int]]:
    """Token ids per text, without special tokens (packing adds BOS and EOS itself)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        # verbose=False: documents longer than model_max_length are expected here.
        out = tokenizer(
            texts[start : start + batch], add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        ids += [list(x) for x in out["input_ids"]]
    return ids


def pack(token_ids: list[list[int]], seq_len: int, eos_id: int | None, bos_id: int | None = None) -> torch.Tensor:
    """Concatenate documents (``eos_id`` after each) and cut into blocks: ``-> [num_blocks, seq_len]`` int64.

    With ``bos_id``, each block is ``bos_id`` then the next ``seq_len - 1`` tokens
    of the stream, so a block that begins mid-document still starts the way the
    model saw every text in pre-training. The tail shorter than a block is dropped.
    """
    lead = 0 if bos_id is None else 1
    if seq_len < 1 + lead:
        raise DataError(f"data.seq_len is {seq_len}; set it to at least {1 + lead} tokens")
    stream = array("q")  # 8 bytes per token, where a list of ints costs ~36
    for doc in token_ids:
        if not len(doc):
            continue
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
    body = seq_len - lead  # stream tokens per block
    num_blocks = len(stream) // body
    if num_blocks == 0:
        raise DataError(
            f"the text holds {len(stream)} tokens but data.seq_len is {seq_len}; lower data.seq_len or add text"
        )
    flat = torch.frombuffer(stream, dtype=torch.int64)
    blocks = flat[: num_blocks * body].view(num_blocks, body)
    if bos_id is None:
        return blocks.clone()
    return torch.cat([torch.full((num_blocks, 1), bos_id, dtype=torch.int64), blocks], dim=1)


def _eos_id(tokenizer) -> int | None:
    """EOS separates documents; BERT-like tokenizers have none and use SEP instead."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


def _split_indices(n: int, eval_fraction: float, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded shuffle of ``range(n)`` -> (train indices, eval indices); eval gets max(1, round(f*n))."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction is {eval_fraction}; set it in [0, 1)")
    if eval_fraction == 0.0:
        return torch.arange(n), torch.arange(0)
    if n < 2:
        raise DataError(
            f"{what}; holding out eval data needs 2: add data, give data.eval, or set data.eval_fraction to 0"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    return order[n_eval:], order[:n_eval]


@dataclass
class LMData:
    """Packed token blocks for language modelling."""

    train: torch.Tensor
    """``[N_train, seq_len]`` int64 token ids."""
    eval: torch.Tensor
    """``[N_eval, seq_len]`` int64; empty ``[0, seq_len]`` only when eval_fraction is 0."""


def _tokenize_bounded(texts: list[str], tokenizer, max_tokens: int | None, eos_id: int | None) -> list[list[int]]:
    """Token ids of the leading documents whose stream (with EOS) reaches ``max_tokens``; all if None."""
    if max_tokens is None:
        return tokenize_texts(texts, tokenizer)
    docs, total, step = [], 0, 1000
    for start in range(0, len(texts), step):
        for doc in tokenize_texts(texts[start : start + step], tokenizer):
            docs.append(doc)
            total += len(doc) + (eos_id is not None)
            if total >= max_tokens:
                return docs
    return docs


def _packed(
    source: str,
    tokenizer,
    seq_len: int,
    text_field: str,
    split: str,
    max_tokens: int | None = None,
    bos_id: int | None = None,
) -> torch.Tensor:
    """``source`` read, tokenised and packed -> ``[N, seq_len]``; at most ``max_tokens // seq_len`` blocks."""
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(
            f"data.max_train_tokens is {max_tokens}, below data.seq_len {seq_len}; raise it or leave it unset"
        )
    eos_id = _eos_id(tokenizer)
    ids = _tokenize_bounded(read_texts(source, text_field=text_field, split=split), tokenizer, max_tokens, eos_id)
    try:
        blocks = pack(ids, seq_len, eos_id, bos_id)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    # Cutting the packed blocks equals cutting the token stream to max_tokens first (BOS counted).
    return blocks if max_tokens is None else blocks[: max_tokens // seq_len]


def build_lm_data(
    train: str,
    tokenizer,
    *,
    seq_len: int,
    eval: str | None = None,
    eval_fraction: float = 0.05,
    text_field: str = "text",
    max_train_tokens: int | None = None,
    seed: int = 0,
    bos_id: int | None = None,
) -> LMData:
    """Read, tokenise and pack ``train`` (and ``eval``) into ``[N, seq_len]`` blocks.

    Without ``eval``, a seeded shuffle of the train blocks holds out
    ``max(1, round(eval_fraction * N))`` of them. ``max_train_tokens`` caps the
    train token stream before packing (and before the split), to bound work.
    With ``bos_id`` (see :func:`resolve_bos`) every block starts with it; None packs text only.
    A ``datasets`` source reads split "train" for ``train`` and "validation" for ``eval``.
    """
    blocks = _packed(train, tokenizer, seq_len, text_field, "train", max_train_tokens, bos_id)
    if eval is not None:
        return LMData(train=blocks, eval=_packed(eval, tokenizer, seq_len, text_field, EVAL_SPLIT, bos_id=bos_id))
    what = f"{train} packs into {len(blocks)} block of data.seq_len={seq_len} tokens"
    train_idx, eval_idx = _split_indices(len(blocks), eval_fraction, seed, what)
    return LMData(train=blocks[train_idx], eval=blocks[eval_idx])


# ----------------------------------------------------------------------------- classification


@dataclass
class ClassificationData:
    """Padded token ids, masks and labels for sequence classification."""

    train_ids: torch.Tensor
    """``[N_train, seq_len]`` int64, padded with the tokenizer's pad id (0 if it has none)."""
    train_mask: torch.Tensor
    """``[N_train, seq_len]`` bool, True on real tokens."""
    train_labels: torch.Tensor
    """``[N_train]`` int64 class ids into ``label_names``."""
    eval_ids: torch.Tensor
    """``[N_eval, seq_len]`` int64."""
    eval_mask: torch.Tensor
    """``[N_eval, seq_len]`` bool."""
    eval_labels: torch.Tensor
    """``[N_eval]`` int64."""
    label_names: list[str]
    """Class names; ``label_names[i]`` is class id ``i``."""


def _encode(texts: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise with special tokens, truncate and pad to ``seq_len`` -> ids ``[N, seq_len]``, mask ``[N, seq_len]``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(texts), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.bool)
    for start in range(0, len(texts), 1000):
        out = tokenizer(
            texts[start : start + 1000],
            add_special_tokens=True,
            truncation=True,
            max_length=seq_len,
            return_attention_mask=False,
        )
        for row, seq in enumerate(out["input_ids"], start=start):
            seq = seq[:seq_len]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
    return ids, mask


def build_classification_data(
    train: str,
    tokenizer,
    *,
    seq_len: int,
    eval: str | None = None,
    eval_fraction: float = 0.1,
    text_field: str = "text",
    label_field: str = "label",
    seed: int = 0,
) -> ClassificationData:
    """Read, tokenise and pad labelled ``train`` (and ``eval``); a seeded split when ``eval`` is None.

    With a separate ``eval`` source, class names come from the union of both
    sources so that the same name always gets the same id. A ``datasets`` source
    reads split "train" for ``train`` and "validation" for ``eval``.
    """
    if seq_len < 1:
        raise DataError(f"data.seq_len is {seq_len}; set it to a positive number of tokens")
    texts, labels, names = _read_labelled_raw(train, text_field, label_field, "train")
    if eval is None:
        names = names or _label_names(labels, train)
        ids, mask = _encode(texts, tokenizer, seq_len)
        y = torch.tensor(_label_ids(labels, names, train), dtype=torch.long)
        tr, ev = _split_indices(len(texts), eval_fraction, seed, f"{train} has {len(texts)} labelled example")
        return ClassificationData(ids[tr], mask[tr], y[tr], ids[ev], mask[ev], y[ev], names)
    eval_texts, eval_labels, eval_names = _read_labelled_raw(eval, text_field, label_field, EVAL_SPLIT)
    names = names or eval_names or _label_names(labels + eval_labels, f"{train} with {eval}")
    train_ids, train_mask = _encode(texts, tokenizer, seq_len)
    eval_ids, eval_mask = _encode(eval_texts, tokenizer, seq_len)
    return ClassificationData(
        train_ids,
        train_mask,
        torch.tensor(_label_ids(labels, names, train), dtype=torch.long),
        eval_ids,
        eval_mask,
        torch.tensor(_label_ids(eval_labels, names, eval), dtype=torch.long),
        names,
    )


# ----------------------------------------------------------------------------- sampling


class BlockSampler:
    """Deterministic, resumable order over N examples.

    An epoch is a permutation from ``torch.Generator(seed + epoch)``; the position
    (epoch, global batches taken) is saved by :meth:`state_dict` and restored by
    :meth:`load_state_dict`, so a resumed run draws the same batches.

    Each global batch is ``batch_size * world_size`` consecutive entries of the
    epoch's permutation; rank ``r`` takes slice ``r``, so ranks see disjoint
    examples. The incomplete last global batch of an epoch is dropped. With fewer
    examples than one global batch, every epoch is a single global batch that
    wraps around its permutation (examples then repeat, across ranks too).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise DataError("the sampler got 0 examples; the training data is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; set it to at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = max(1, num_examples // self.global_batch)
        self.epoch, self.position = 0, 0  # position: global batches already taken this epoch
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) cache

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.num_examples, generator=g))
        return self._perm[1]

    def next_indices(self) -> torch.Tensor:
        """This rank's example indices for the next step: LongTensor ``[batch_size]``."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        slots = torch.arange(start, start + self.batch_size) % self.num_examples
        self.position += 1
        return self._permutation()[slots]

    def state_dict(self) -> dict:
        """``{"epoch": int, "position": int}``: where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not {"epoch", "position"} <= set(state):
            raise ValueError(
                f"sampler state needs 'epoch' and 'position', got {sorted(state)}; pass state_dict() output"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"sampler state {state} does not fit {self.batches_per_epoch} batches per epoch; "
                "resume with the same data, batch size and world size"
            )
        self.epoch, self.position = epoch, position
