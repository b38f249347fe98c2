"""Training blocks for a teacher and a student with different tokenizers: the same text in both, with aligned spans.

The documents are joined with a blank line into one text, which the student's
tokenizer cuts into blocks of ``seq_len`` tokens (BOS first where it wants one).
Each block's text is then tokenized by the teacher's tokenizer, and the two
token sequences are aligned (:func:`alignkd.data.spans.align`): every token
gets the index of its span, and the span-level terms compare the two models
span by span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignkd.data.spans import align
from alignkd.errors import ConfigError

NO_SPAN = -1
"""The span index of a token no span holds (padding; spans past a teacher block cut at ``teacher_len``)."""


@dataclass
class PairedBlocks:
    """``N`` blocks of one text in both tokenizations."""

    student_ids: torch.Tensor
    """``[N, T]`` the student's tokens (BOS first where its tokenizer adds one)."""
    teacher_ids: torch.Tensor
    """``[N, U]`` the teacher's tokens of the same text, padded on the right."""
    teacher_mask: torch.Tensor
    """``[N, U]`` bool: real teacher tokens."""
    student_span: torch.Tensor
    """``[N, T]`` int32: the span of each student token, ``NO_SPAN`` for none."""
    teacher_span: torch.Tensor
    """``[N, U]`` int32: the same for the teacher's tokens."""

    def __len__(self) -> int:
        return self.student_ids.shape[0]


def _encode(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    if not tokenizer.is_fast:
        raise ConfigError(
            f"{type(tokenizer).__name__} gives no character offsets, which aligning two tokenizers needs; "
            "load the model's fast tokenizer (a tokenizer.json)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc["input_ids"], np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def pair_blocks(
    texts: list[str],
    student_tok,
    teacher_tok,
    *,
    seq_len: int,
    student_bos: int | None = None,
    teacher_bos: int | None = None,
    teacher_len: int | None = None,
) -> PairedBlocks:
    """Blocks of ``seq_len`` student tokens over ``texts`` and the teacher's tokens of each block's text.

    ``*_bos``: the BOS id each side puts first (None: none). ``teacher_len``: the
    most teacher tokens a block keeps (None: the longest block's); spans cut by it
    hold no tokens (``NO_SPAN``).
    """
    text = "\n\n".join(t for t in texts if t)
    ids, offsets = _encode(student_tok, text)
    per_block = seq_len - (student_bos is not None)
    n = len(ids) // per_block
    if n == 0:
        raise ConfigError(
            f"data.train: the text makes {len(ids)} student tokens, fewer than one block of {per_block}; "
            "add text or lower data.seq_len"
        )
    rows = []
    for b in range(n):
        lo, hi = b * per_block, (b + 1) * per_block
        # The block's text: from where the tokens before it end (text skipped by the offsets goes with the first
        # token) to the end of its last token.
        start = int(offsets[lo - 1, 1]) if lo else 0
        end = max(int(offsets[hi - 1, 1]), start)
        piece = text[start:end]
        s_ids = ([student_bos] if student_bos is not None else []) + ids[lo:hi]
        s_off = np.concatenate([[[0, 0]] if student_bos is not None else np.zeros((0, 2), np.int64), offsets[lo:hi]])
        s_off = np.where(s_off[:, 1:] > s_off[:, :1], s_off - start, 0)  # special tokens keep (0, 0)
        t_ids, t_off = _encode(teacher_tok, piece)
        if teacher_bos is not None:
            t_ids, t_off = [teacher_bos, *t_ids], np.concatenate([[[0, 0]], t_off])
        spans = align(t_off, np.clip(s_off, 0, len(piece)), len(piece))
        rows.append((s_ids, t_ids, spans.of_tokens("student"), spans.of_tokens("teacher")))
    width = teacher_len or max(len(r[1]) for r in rows)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    out = PairedBlocks(
        student_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
        teacher_ids=torch.full((n, width), pad, dtype=torch.long),
        teacher_mask=torch.zeros(n, width, dtype=torch.bool),
        student_span=torch.tensor(np.stack([r[2] for r in rows]), dtype=torch.int32),
        teacher_span=torch.full((n, width), NO_SPAN, dtype=torch.int32),
    )
    for i, (_, t_ids, _, t_span) in enumerate(rows):
        k = min(len(t_ids), width)
        out.teacher_ids[i, :k] = torch.tensor(t_ids[:k])
        out.teacher_mask[i, :k] = True
        out.teacher_span[i, :k] = torch.from_numpy(t_span[:k].astype(np.int32))
        if k < len(t_ids):  # the teacher's block was cut: the spans it does not finish hold nothing on either side
            whole = int(t_span[k]) if k < len(t_span) else len(t_span)
            out.teacher_span[i, :k][out.teacher_span[i, :k] >= whole] = NO_SPAN
            out.student_span[i][out.student_span[i] >= whole] = NO_SPAN
    return out
