"""Aligning two tokenizations of one text: the spans of text where both tokenizers have a token boundary.

Two tokenizers cut the same text at different places. Where both cut at the
same character, the text between two such shared cuts is an aligned span:
``m`` teacher tokens and ``n`` student tokens that spell the same characters.
Span-level losses compare the two models on these spans (the likelihood of a
span, its last token's state).

Cuts come from each tokenizer's character offsets (``return_offsets_mapping``):

- a position is a cut for a tokenizer when no token of it straddles the
  position. Tokens that share a character (a 4-byte emoji split over two
  byte-level tokens) straddle the character, so no cut falls inside it;
- text covered by no token (whitespace a tokenizer's offsets leave out) lies
  between cuts and belongs to no token;
- tokens without text (BOS, other special tokens: offsets ``(0, 0)``) belong to
  the span of the next token with text, or to the last span.

A shared cut becomes a span boundary only when both sides have tokens since the
last one, so every span has at least one token on each side and the spans
partition both token sequences in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spans:
    """Aligned spans of one text: span ``k`` holds teacher tokens ``teacher[k-1]:teacher[k]`` (``teacher[-1]`` read as
    0), student tokens ``student[k-1]:student[k]``, and characters ``chars[k-1]:chars[k]`` of the text."""

    teacher: np.ndarray
    """``[K]`` int64: teacher tokens up to the end of each span (increasing; the last is every teacher token)."""
    student: np.ndarray
    """``[K]`` int64: the same for the student's tokens."""
    chars: np.ndarray
    """``[K]`` int64: the character where each span ends (the last is the text's length)."""

    def __len__(self) -> int:
        return len(self.chars)

    def of_tokens(self, side: str) -> np.ndarray:
        """``[tokens]`` int64: the span each of ``side``'s tokens ("teacher" or "student") belongs to."""
        ends = self.teacher if side == "teacher" else self.student
        count = int(ends[-1]) if len(ends) else 0
        return np.searchsorted(ends, np.arange(count), side="right")


def _cuts(offsets: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One side's cuts: the positions ``[C]`` (0 to ``length``) no token straddles, and the tokens before each.

    ``offsets``: ``[N, 2]`` character start and end of each token, in token order.
    """
    n = len(offsets)
    starts, ends = offsets[:, 0], offsets[:, 1]
    text = ends > starts
    # A token [s, e) straddles the positions s+1 .. e-1: count them with a difference array.
    inside = np.zeros(length + 2, dtype=np.int64)
    np.add.at(inside, starts[text] + 1, 1)
    np.add.at(inside, ends[text], -1)
    free = np.cumsum(inside)[: length + 1] == 0
    positions = np.flatnonzero(free)
    # Tokens before cut c: every token before the first token with text that starts at or after c (tokens without
    # text go with the next token that has some).
    real = np.flatnonzero(text)
    if not len(real):
        return positions, np.full(len(positions), n, dtype=np.int64)
    first_after = np.searchsorted(starts[real], positions, side="left")
    before = np.where(first_after < len(real), real[np.minimum(first_after, len(real) - 1)], n)
    return positions, before


def align(teacher_offsets, student_offsets, length: int) -> Spans:
    """The aligned spans of a text of ``length`` characters tokenized both ways.

    ``*_offsets``: ``[N, 2]`` (start, end) character offsets of each token, as a fast tokenizer's
    ``offset_mapping`` gives them (``(0, 0)`` for a special token).
    """
    t_off = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    s_off = np.asarray(student_offsets, dtype=np.int64).reshape(-1, 2)
    t_pos, t_before = _cuts(t_off, length)
    s_pos, s_before = _cuts(s_off, length)
    shared, ti, si = np.intersect1d(t_pos, s_pos, assume_unique=True, return_indices=True)
    a, b = t_before[ti], s_before[si]
    t_ends, s_ends, c_ends = [], [], []
    last_a = last_b = 0
    for c, x, y in zip(shared.tolist(), a.tolist(), b.tolist(), strict=True):
        if x > last_a and y > last_b:
            t_ends.append(x), s_ends.append(y), c_ends.append(c)
            last_a, last_b = x, y
    n_t, n_s = len(t_off), len(s_off)
    if n_t and n_s and (last_a < n_t or last_b < n_s):
        # Tokens left after the last shared cut (text only one side covers, or special tokens at the end): they
        # join the last span, which then reaches the end of the text.
        if t_ends and (last_a == n_t or last_b == n_s):
            t_ends[-1], s_ends[-1], c_ends[-1] = n_t, n_s, length
        else:
            t_ends.append(n_t), s_ends.append(n_s), c_ends.append(length)
    elif c_ends:
        c_ends[-1] = length
    return Spans(np.array(t_ends, dtype=np.int64), np.array(s_ends, dtype=np.int64), np.array(c_ends, dtype=np.int64))
