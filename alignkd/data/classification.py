"""Labelled examples -> padded token ids, masks and class ids for sequence classification."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkd.data.sampler import split_indices
from alignkd.data.sources import EVAL_SPLIT, class_ids, class_names, read_labelled_raw
from alignkd.errors import DataError


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
    texts, labels, names = read_labelled_raw(train, text_field, label_field, "train")
    if eval is None:
        names = names or class_names(labels, train)
        ids, mask = _encode(texts, tokenizer, seq_len)
        y = torch.tensor(class_ids(labels, names, train), dtype=torch.long)
        tr, ev = split_indices(len(texts), eval_fraction, seed, f"{train} has {len(texts)} labelled example")
        return ClassificationData(ids[tr], mask[tr], y[tr], ids[ev], mask[ev], y[ev], names)
    eval_texts, eval_labels, eval_names = read_labelled_raw(eval, text_field, label_field, EVAL_SPLIT)
    names = names or eval_names or class_names(labels + eval_labels, f"{train} with {eval}")
    train_ids, train_mask = _encode(texts, tokenizer, seq_len)
    eval_ids, eval_mask = _encode(eval_texts, tokenizer, seq_len)
    return ClassificationData(
        train_ids,
        train_mask,
        torch.tensor(class_ids(labels, names, train), dtype=torch.long),
        eval_ids,
        eval_mask,
        torch.tensor(class_ids(eval_labels, names, eval), dtype=torch.long),
        names,
    )
