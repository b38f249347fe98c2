"""Rows of token ids -> the padded tensors alignkd's terms read, and those tensors -> the step's ``Batch``.

The conventions are ``alignkd distill``'s: rows padded on the right (a leading BOS
sits at column 0, where the feature terms leave it out), ``attention_mask`` True
on real tokens. Without ``labels`` every real position counts, as on the packed
blocks of ``alignkd distill`` (the output terms read the last one too). With
``labels`` (Hugging Face's convention: ``labels[i]`` is the token at ``i``, -100
where it is not a target, the model shifting them itself) a position counts
when the token after it is a target: what a generated batch's ``scored`` mask
means to the engine, and what Hugging Face's own causal-LM loss averages over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from alignkd.align.tasks import Batch
from alignkd.errors import DataError

IGNORE = -100
"""A label that is no target (Hugging Face's ``ignore_index``)."""


@dataclass
class DistillCollator:
    """Tokenised rows -> ``{"input_ids", "attention_mask"}`` ``[B, T]`` tensors (and ``labels`` when asked or given).

    A row is a list of ids, or a mapping with ``input_ids`` (and optionally its own
    ``attention_mask`` and ``labels``, e.g. a prompt masked with -100).
    """

    pad_id: int = 0
    """Id written into padding (never read: padding is masked out)."""
    labels: bool = False
    """Also return ``labels``: the ids, -100 on padding. The terms then count the positions that predict a real
    token, which leaves out each row's last one."""
    max_length: int | None = None
    """Cut longer rows to this many tokens (None: keep them whole)."""

    def __call__(self, rows: Sequence) -> dict[str, torch.Tensor]:
        if not rows:
            raise DataError("DistillCollator: an empty batch; give at least one row of token ids")
        ids, masks, labels = zip(*(self._row(r, i) for i, r in enumerate(rows)), strict=True)
        width = max(len(r) for r in ids)
        out = {
            "input_ids": _pad(ids, width, self.pad_id),
            "attention_mask": _pad(masks, width, 0),
        }
        if self.labels or any(lab is not None for lab in labels):
            given = [lab if lab is not None else [t if m else IGNORE for t, m in zip(r, k, strict=True)]
                     for r, k, lab in zip(ids, masks, labels, strict=True)]  # fmt: skip
            out["labels"] = _pad(given, width, IGNORE)
        return out

    def _row(self, row, i: int) -> tuple[list[int], list[int], list[int] | None]:
        mapping = isinstance(row, Mapping)
        if mapping and "input_ids" not in row:
            raise DataError(f"DistillCollator: row {i} has no input_ids (keys: {', '.join(map(str, row))})")
        ids = _ints(row["input_ids"] if mapping else row)
        if not ids:
            raise DataError(f"DistillCollator: row {i} has no tokens; drop empty rows before training")
        mask = _ints(row["attention_mask"]) if mapping and row.get("attention_mask") is not None else [1] * len(ids)
        labels = _ints(row["labels"]) if mapping and row.get("labels") is not None else None
        if len(mask) != len(ids) or (labels is not None and len(labels) != len(ids)):
            raise DataError(f"DistillCollator: row {i}'s attention_mask or labels is not as long as its input_ids")
        n = self.max_length or len(ids)
        return ids[:n], mask[:n], labels[:n] if labels is not None else None


def _ints(values) -> list[int]:
    return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def _pad(rows: Sequence[list[int]], width: int, fill: int) -> torch.Tensor:
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def to_batch(inputs: Mapping[str, torch.Tensor]) -> Batch:
    """The collated tensors as the engine's ``Batch``: ``labels`` become the positions counted (``scored``)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = inputs.get("labels")
    if labels is None:
        return Batch(ids, mask)
    if labels.shape != ids.shape or not ((labels == ids) | (labels == IGNORE)).all():
        raise DataError(
            "labels: alignkd's terms predict the next input id, so labels may only be the input_ids with -100 "
            "where a token is no target; pass other targets as input_ids"
        )
    scored = torch.zeros_like(mask)
    scored[:, :-1] = mask[:, :-1] & (labels[:, 1:] != IGNORE)  # position i predicts token i + 1
    return Batch(ids, mask, scored=scored)


def counted(inputs: Mapping[str, torch.Tensor]) -> int:
    """Positions the token-level terms average over in one collated batch."""
    return int(to_batch(inputs).counted_mask.sum())
