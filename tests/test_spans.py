"""Aligned spans between two tokenizations of one text (``alignkd.data.spans``).

Tokenizers of three conventions are trained here on a few sentences: byte-level
BPE (GPT-2's ``Ġ`` and byte splitting of multi-byte characters), a
SentencePiece-like BPE (``▁`` for spaces, byte fallback) and one of
WordPiece-like whitespace splitting; the packaged SmolLM2 tokenizer joins them
where it is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkd.data.spans import align

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Naïve café owners serve crème brûlée at 9:30, don't they?",
    "Distillation keeps most of a model's quality 😀 in fewer parameters.",
    "Über straße ĳ ﬁ — “quotes” and tabs\tand\nnew lines.",
] * 4


def _fast(tok: Tokenizer, bos: str | None = None) -> PreTrainedTokenizerFast:
    out = PreTrainedTokenizerFast(tokenizer_object=tok)
    if bos is not None:
        out.add_special_tokens({"bos_token": bos})
    return out


def byte_level_bpe(vocab: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _fast(tok)


def metaspace_bpe(vocab: int = 200) -> PreTrainedTokenizerFast:
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab + 256, special_tokens=["<unk>", "<s>", *byte_tokens])
    tok.train_from_iterator(CORPUS, trainer)
    return _fast(tok, bos="<s>")


def whitespace_wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]"]))
    return _fast(tok)


def _offsets(tok, text: str, bos: bool = False) -> np.ndarray:
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return np.array(([(0, 0)] if bos else []) + offsets, dtype=np.int64).reshape(-1, 2)


TOKENIZERS = {"byte_bpe": byte_level_bpe(), "metaspace": metaspace_bpe(), "wordpiece": whitespace_wordpiece()}
SMOL = Path.home() / ".cache" / "alignkd" / "teacher"
if (SMOL / "tokenizer.json").is_file():
    from transformers import AutoTokenizer

    TOKENIZERS["smollm2"] = AutoTokenizer.from_pretrained(str(SMOL))


def _check_partition(text: str, t_off: np.ndarray, s_off: np.ndarray) -> None:
    spans = align(t_off, s_off, len(text))
    if len(t_off) == 0 or len(s_off) == 0:
        assert len(spans) == 0
        return
    for ends, count in ((spans.teacher, len(t_off)), (spans.student, len(s_off))):
        assert (np.diff(ends) > 0).all() and ends[0] > 0 and ends[-1] == count  # every span has tokens on each side
    assert (np.diff(spans.chars) > 0).all() and spans.chars[-1] == len(text)  # the text once, in order
    for side, off in (("teacher", t_off), ("student", s_off)):
        of = spans.of_tokens(side)
        assert (np.diff(of) >= 0).all() and len(of) == len(off)
        lo = np.concatenate([[0], spans.chars])[of]
        hi = spans.chars[of]
        real = off[:, 1] > off[:, 0]
        # every token with text lies inside its span's characters
        assert (off[real, 0] >= lo[real]).all() and (off[real, 1] <= hi[real]).all()


texts = st.text(
    alphabet=st.sampled_from(list("abcdefghij klmnop  \t\n.,'!?ïéüß—“”😀🙂ĳﬁ0123")), min_size=0, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(text=texts, pair=st.sampled_from([(a, b) for a in TOKENIZERS for b in TOKENIZERS]), bos=st.booleans())
def test_spans_partition_both_token_sequences_and_cover_the_text_once(text, pair, bos):
    t, s = (TOKENIZERS[n] for n in pair)
    _check_partition(text, _offsets(t, text, bos=bos), _offsets(s, text))


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_identical_tokenizers_give_one_span_per_token(name):
    tok = TOKENIZERS[name]
    for text in CORPUS[:4]:
        off = _offsets(tok, text)
        spans = align(off, off, len(text))
        # tokens that share a character (bytes of one emoji) form one span; every other token is its own
        shared = np.sum(off[1:, 0] < off[:-1, 1])
        assert len(spans) == len(off) - shared
        assert np.array_equal(spans.teacher, spans.student)


def test_a_bos_on_one_side_joins_the_first_span_and_special_tokens_at_the_end_the_last():
    text = "The quick brown fox."
    t = _offsets(TOKENIZERS["byte_bpe"], text, bos=True)
    s = _offsets(TOKENIZERS["metaspace"], text)
    spans = align(t, s, len(text))
    plain = align(t[1:], s, len(text))
    assert spans.teacher[0] == plain.teacher[0] + 1 and np.array_equal(spans.teacher[1:], plain.teacher[1:] + 1)
    with_eos = np.concatenate([t, [[0, 0]]])  # an EOS the template gives offsets (0, 0)
    assert align(with_eos, s, len(text)).teacher[-1] == len(with_eos)


def test_tokens_that_share_a_multi_byte_character_stay_in_one_span():
    tok = TOKENIZERS["byte_bpe"]
    text = "a 😀 b"
    off = _offsets(tok, text)
    emoji = text.index("😀")
    touching = [i for i, (s, e) in enumerate(off) if s <= emoji < e]
    assert len(touching) > 1  # byte-level BPE splits the emoji's 4 bytes over tokens
    words = np.array([[0, 1], [2, 3], [4, 5]])  # a tokenizer that keeps it whole
    spans = align(off, words, len(text))
    assert len({int(spans.of_tokens("teacher")[i]) for i in touching}) == 1


# ----------------------------------------------------------------------------- paired blocks


def test_paired_blocks_hold_the_same_text_in_both_tokenizations_with_matching_spans():
    from alignkd.data.pairs import NO_SPAN, pair_blocks

    student, teacher = TOKENIZERS["byte_bpe"], TOKENIZERS["metaspace"]
    bos = teacher.convert_tokens_to_ids("<s>")
    blocks = pair_blocks(CORPUS, student, teacher, seq_len=16, teacher_bos=bos)
    whole = student("\n\n".join(CORPUS), add_special_tokens=False)["input_ids"]
    assert blocks.student_ids.shape == (len(whole) // 16, 16)
    assert blocks.student_ids.flatten().tolist() == whole[: blocks.student_ids.numel()]  # the text, in order
    for i in range(len(blocks)):
        s_span, t_span = blocks.student_span[i], blocks.teacher_span[i][blocks.teacher_mask[i]]
        assert blocks.teacher_ids[i, 0] == bos and t_span[0] == 0  # the teacher's BOS joins the first span
        for span in (s_span, t_span):  # spans run 0, 1, 2, ... in token order on both sides
            kept = span[span != NO_SPAN]
            assert kept[0] == 0 and ((kept[1:] - kept[:-1]) >= 0).all() and ((kept[1:] - kept[:-1]) <= 1).all()
        assert set(s_span.tolist()) - {NO_SPAN} == set(t_span.tolist()) - {NO_SPAN}
        # the teacher's tokens spell the student's text (whose ends may hold part of a character split over tokens)
        text = student.decode(blocks.student_ids[i]).strip().strip("\ufffd").strip()
        assert text in teacher.decode(blocks.teacher_ids[i][blocks.teacher_mask[i]], skip_special_tokens=True)


def test_a_teacher_block_cut_short_leaves_its_unfinished_spans_out_on_both_sides():
    from alignkd.data.pairs import NO_SPAN, pair_blocks

    student, teacher = TOKENIZERS["byte_bpe"], TOKENIZERS["metaspace"]
    full = pair_blocks(CORPUS, student, teacher, seq_len=16)
    cut = pair_blocks(CORPUS, student, teacher, seq_len=16, teacher_len=6)
    assert cut.teacher_ids.shape[1] == 6
    # A limit beyond every block (a teacher's 8,192 positions) pads to the longest block, not to the limit.
    assert (
        pair_blocks(CORPUS, student, teacher, seq_len=16, teacher_len=8192).teacher_ids.shape == full.teacher_ids.shape
    )
    for i in range(len(cut)):
        last = int(cut.teacher_span[i].max())
        assert (cut.student_span[i] <= last).all() and (
            full.student_span[i][cut.student_span[i] == NO_SPAN] > last
        ).all()
        assert torch.equal(cut.teacher_ids[i], full.teacher_ids[i, :6])


def test_a_slow_tokenizer_cannot_be_aligned():
    from transformers import PreTrainedTokenizer

    from alignkd.data.pairs import pair_blocks
    from alignkd.errors import ConfigError

    class Slow(PreTrainedTokenizer):
        is_fast = False

    with pytest.raises(ConfigError, match="gives no character offsets"):
        pair_blocks(CORPUS, Slow.__new__(Slow), TOKENIZERS["byte_bpe"], seq_len=8)
