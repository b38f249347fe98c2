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
    student_bytes: torch.Tensor
    """``[N]`` int64: UTF-8 bytes of the text the student predicts in each block (all but its first token's; with a
    BOS first, all of it): what held-out bits per byte divide by."""
    teacher_bytes: torch.Tensor
    """``[N]`` int64: the same for the teacher's tokens of the block."""

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


def _predicted_bytes(piece: str, offsets: np.ndarray, kept: int) -> int:
    """UTF-8 bytes of ``piece`` from the end of the first token to the end of the ``kept``-th: the text a model
    predicts of a block (a special first token, such as BOS, ends at 0)."""
    if kept < 2:
        return 0
    start = int(offsets[0, 1])
    end = max(int(offsets[:kept, 1].max()), start)
    return len(piece[start:end].encode("utf-8"))


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
    most teacher tokens a block keeps (the teacher's positions; None: no limit);
    the teacher's blocks are as wide as the longest one, up to that, and spans cut
    by it hold no tokens (``NO_SPAN``).
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
        rows.append((s_ids, t_ids, spans.of_tokens("student"), spans.of_tokens("teacher"), piece, s_off, t_off))
    width = max(len(r[1]) for r in rows)
    width = min(width, teacher_len) if teacher_len else width
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    return _stack(rows, width, pad)


def _stack(rows: list[tuple], width: int, pad: int) -> PairedBlocks:
    """The blocks' rows ``(student ids, teacher ids, student spans, teacher spans, text, student offsets, teacher
    offsets)`` as tensors, the teacher's side ``width`` wide."""
    n = len(rows)
    out = PairedBlocks(
        student_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
        teacher_ids=torch.full((n, width), pad, dtype=torch.long),
        teacher_mask=torch.zeros(n, width, dtype=torch.bool),
        student_span=torch.tensor(np.stack([r[2] for r in rows]), dtype=torch.int32),
        teacher_span=torch.full((n, width), NO_SPAN, dtype=torch.int32),
        student_bytes=torch.tensor([_predicted_bytes(r[4], r[5], len(r[5])) for r in rows], dtype=torch.long),
        teacher_bytes=torch.tensor([_predicted_bytes(r[4], r[6], min(len(r[6]), width)) for r in rows]),
    )
    for i, (_, t_ids, _, t_span, *_) in enumerate(rows):
        k = min(len(t_ids), width)
        out.teacher_ids[i, :k] = torch.tensor(t_ids[:k])
        out.teacher_mask[i, :k] = True
        out.teacher_span[i, :k] = torch.from_numpy(t_span[:k].astype(np.int32))
        if k < len(t_ids):  # the teacher's block was cut: the spans it does not finish hold nothing on either side
            whole = int(t_span[k]) if k < len(t_span) else len(t_span)
            out.teacher_span[i, :k][out.teacher_span[i, :k] >= whole] = NO_SPAN
            out.student_span[i][out.student_span[i] >= whole] = NO_SPAN
    return out


def _as_dict(p: PairedBlocks, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    d = {
        "input_ids": p.student_ids,
        "teacher_ids": p.teacher_ids,
        "teacher_mask": p.teacher_mask,
        "student_span": p.student_span,
        "teacher_span": p.teacher_span,
        "student_bytes": p.student_bytes,
        "teacher_bytes": p.teacher_bytes,
    }
    return d if rows is None else {k: v[rows] for k, v in d.items()}


def build_paired_data(
    train: str,
    student_tok,
    teacher_tok,
    *,
    seq_len: int,
    eval: str | None,
    eval_fraction: float,
    text_field: str,
    max_train_tokens: int | None,
    seed: int,
    student_bos: int | None,
    teacher_bos: int | None,
    teacher_len: int | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training and held-out blocks in both tokenizations (the fields of :class:`PairedBlocks`, by name), the
    held-out ones from ``eval`` or split off the training blocks as ``build_lm_data`` does.

    ``teacher_len``: the most teacher tokens a block keeps (the teacher's positions); None: the longest block's.
    """
    from alignkd.data.sampler import split_indices
    from alignkd.data.sources import EVAL_SPLIT, read_texts

    def paired(source: str, split: str, most: int | None = None) -> PairedBlocks:
        texts = read_texts(source, text_field=text_field, split=split)
        if not texts:
            raise ConfigError(f"data: {source} holds no text")
        if most is not None:  # only the documents the capped blocks reach are paired
            total = 0
            for k, text in enumerate(texts):
                total += len(student_tok(text, add_special_tokens=False, verbose=False)["input_ids"])
                if total >= most:
                    texts = texts[: k + 1]
                    break
        return pair_blocks(
            texts,
            student_tok,
            teacher_tok,
            seq_len=seq_len,
            student_bos=student_bos,
            teacher_bos=teacher_bos,
            teacher_len=teacher_len,
        )

    blocks = paired(train, "train", None if max_train_tokens is None else max_train_tokens + seq_len)
    n = len(blocks)
    if max_train_tokens is not None:
        n = max(1, min(n, max_train_tokens // seq_len))
    if eval is not None:
        return _as_dict(blocks, torch.arange(n)), _as_dict(paired(eval, EVAL_SPLIT))
    train_rows, eval_rows = split_indices(n, eval_fraction, seed, "data.train")
    return _as_dict(blocks, train_rows), _as_dict(blocks, eval_rows)


def token_texts(tokenizer) -> list[str | None]:
    """The text each id spells where it follows other text (``"Ġthe"`` and ``"▁the"`` both give ``" the"``,
    WordPiece's ``"##s"`` gives ``"s"``); None for special tokens and for pieces of a character (byte-level
    tokens of part of a UTF-8 sequence)."""
    prefix = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    base = tokenizer.convert_tokens_to_string(prefix)
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None:
            out.append(None)
            continue
        text = tokenizer.convert_tokens_to_string([*prefix, token])
        ok = text.startswith(base) and len(text) > len(base) and "\ufffd" not in text
        out.append(text[len(base) :] if ok else None)
    return out


def _keys(tokenizer) -> list[tuple[str, str]]:
    """Per id, what it is matched by: its text, else (special tokens, pieces of a character) its token string."""
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        ("text", t) if t is not None else ("token", str(r)) for t, r in zip(token_texts(tokenizer), raw, strict=True)
    ]


def matched_tokens(student_tok, teacher_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """``([M], [M])`` int64: the student's and the teacher's ids of the tokens that spell the same text (each text
    once, its lowest id on each side). Tokens without a text of their own (special tokens, pieces of a character)
    match a token of the same name, so two identical tokenizers match every id with itself."""
    teacher_ids: dict[tuple[str, str], int] = {}
    for i, key in enumerate(_keys(teacher_tok)):
        teacher_ids.setdefault(key, i)
    pairs, seen = [], set()
    for i, key in enumerate(_keys(student_tok)):
        if key in teacher_ids and key not in seen:
            seen.add(key)
            pairs.append((i, teacher_ids[key]))
    s, t = zip(*pairs, strict=True) if pairs else ((), ())
    return torch.tensor(s, dtype=torch.long), torch.tensor(t, dtype=torch.long)
