"""Distillation across tokenizers: a student with a tokenizer of its own, the span terms, and what they refuse.

The teacher is the tiny byte-level model of the fixtures; the student is a new
model whose byte-level BPE tokenizer is trained on the training text
(``student.new_tokenizer``), so the two cut the text at different places.
"""

from __future__ import annotations

import copy

import pytest
import torch

import alignkd
from alignkd import testing as tiny
from alignkd.align.tasks import PairedLM
from alignkd.data.pairs import matched_tokens, pair_blocks
from alignkd.errors import ConfigError
from alignkd.losses.logits import kl_div
from alignkd.models.capture import Record
from alignkd.terms import TERM_TYPES, StepTensors, Term
from tests.test_engine import make_cfg, read_metrics, resume_copy, student_weights

NEW = {
    "config": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64},
    "init": "random",
    "new_tokenizer": 320,
}
SPAN_LOSSES = [
    {"type": "ce", "weight": 0.5},
    {"type": "span_likelihood"},
    {"type": "hybrid", "temperature": 2.0},
    {"type": "span_hidden", "layers": "last"},
]


def _cfg(teacher, corpus, out, **kw):
    return make_cfg(teacher, corpus, out, losses=kw.pop("losses", SPAN_LOSSES), student=NEW, **kw)


@pytest.mark.slow  # two short runs, in process
def test_a_student_with_its_own_tokenizer_trains_on_span_terms_and_keeps_its_tokenizer(teacher, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    summary = alignkd.distill(_cfg(teacher, corpus, out, steps=4, eval_every=2))
    rows, evals = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss/ce", "loss/span_likelihood", "loss/hybrid", "loss/span_hidden"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
    assert rows[-1]["loss/span_likelihood"] > 0 and rows[-1]["loss/hybrid"] > 0
    # The student keeps its own tokenizer, which reads the text in fewer tokens than the teacher's bytes.
    tok = AutoTokenizer.from_pretrained(out / "student")
    assert len(tok) == 320
    assert len(tok(tiny.TEXT)["input_ids"]) < len(tiny.TEXT.encode())
    # Perplexities over two tokenizers do not compare; bits per byte do, and both are logged.
    assert summary["teacher_eval"]["eval_bpb"] > 0 and summary["student_eval"]["eval_bpb"] > 0
    assert evals and all("eval_bpb" in e for e in evals)
    # The tokenizer trained on the text is kept beside it and reused by the next run.
    kept = list((corpus.parent / ".alignkd-tokenizers").glob("bpe320-*"))
    assert len(kept) == 1
    again = alignkd.distill(_cfg(teacher, corpus, tmp_path / "again", steps=1))
    assert again["steps"] == 1 and list((corpus.parent / ".alignkd-tokenizers").glob("bpe320-*")) == kept


@pytest.mark.slow
def test_resume_across_tokenizers_equals_the_uninterrupted_run(teacher, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = _cfg(teacher, corpus, a, steps=4, save_every=2, keep_checkpoints=10)
    alignkd.distill(cfg)
    resume_copy(a, b, cfg, 4)
    rows_a, _ = read_metrics(a)
    rows_b, _ = read_metrics(b)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 3, 4]
    for ra, rb in zip(rows_a[2:], rows_b[4:], strict=True):
        for k in ("loss", "loss/span_likelihood", "loss/hybrid", "loss/span_hidden"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    wa, wb = student_weights(a), student_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_the_hybrid_on_one_tokenizer_is_the_forward_kl_values_and_gradients():
    """The cross-tokenizer path with the same tokenizer on both sides: every span is one token, every token matched,
    and the hybrid equals the same-tokenizer forward KL over the positions that predict a next token."""
    tok = tiny.byte_tokenizer()
    blocks = pair_blocks([tiny.TEXT * 2], tok, tok, seq_len=24)
    assert torch.equal(blocks.student_ids, blocks.teacher_ids) and torch.equal(blocks.student_span, blocks.teacher_span)
    g = torch.Generator().manual_seed(0)
    n, t, v = blocks.student_ids.shape[0], 24, len(tok)
    student = torch.randn(n, t, v, generator=g, requires_grad=True)
    teacher = torch.randn(n, t, v, generator=g)
    task = PairedLM(tok, tok, matched_tokens(tok, tok), None)
    b = task.make_batch(
        {
            "input_ids": blocks.student_ids,
            "teacher_ids": blocks.teacher_ids,
            "teacher_mask": blocks.teacher_mask,
            "student_span": blocks.student_span,
            "teacher_span": blocks.teacher_span,
        },
        torch.arange(n),
        tok,
        0,
    )
    hybrid = TERM_TYPES["hybrid"]
    term = Term(hybrid.config(temperature=2.0, name="hybrid"))
    x = StepTensors(
        input_ids=b.input_ids,
        mask=b.mask,
        labels=None,
        task=task,
        student=Record(logits=student),
        teacher=Record(logits=teacher),
        vocab=0,
        side=None,
        pair=b.pair,
    )
    got = hybrid.compute(term, x, 2.0)
    every_but_last = torch.ones(n, t, dtype=torch.bool)
    every_but_last[:, -1] = False
    s2 = student.detach().clone().requires_grad_(True)
    want = kl_div(s2, teacher, every_but_last, kind="forward", temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(student.grad, s2.grad, rtol=1e-5, atol=1e-9)


def _refused(cfg, match):
    with pytest.raises(ConfigError, match=match) as e:
        alignkd.distill(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.update(losses=[{"type": "kl"}]), r"losses\[0\] \(kl\): the student's tokenizer is not"),
        (lambda c: c["teacher"].update(cache="nowhere"), "teacher.cache"),
        (
            lambda c: c.update(generation={"sources": {"dataset": 0.5, "student": 0.5}, "prompt_tokens": 4}),
            "generation.sources",
        ),
        (lambda c: c["student"].update(init="prune"), "student.new_tokenizer: only a student built with new"),
        (lambda c: c["student"].update(tokenizer="x"), "set tokenizer .* or new_tokenizer .*, not both"),
    ],
)
def test_what_cannot_run_across_tokenizers_is_one_line(teacher, corpus, tmp_path, change, match):
    cfg = _cfg(teacher, corpus, tmp_path / "run")
    change(cfg)
    _refused(cfg, match)


def test_a_span_term_with_one_tokenizer_is_one_line(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "span_likelihood"}])
    _refused(cfg, r"losses\[0\] \(span_likelihood\): compares two tokenizations")


def test_a_classifier_teacher_cannot_pair_tokenizers(tmp_path, corpus):
    teacher = tiny.save_model(tmp_path / "clf", task="sequence_classification")
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"a good film {i},1\na bad film {i},0\n" for i in range(20)))
    cfg = make_cfg(teacher, csv, tmp_path / "run", losses=[{"type": "ce"}], task="sequence_classification")
    cfg["student"] = copy.deepcopy(NEW)
    _refused(cfg, "distilling across tokenizers needs a causal LM teacher")


def test_a_tokenizer_that_extends_the_teachers_distils_directly(teacher, corpus, tmp_path):
    """Shared ids over a shared range (a padded or extended vocabulary): the plain path, over the teacher's ids."""
    tok = tiny.byte_tokenizer()
    tok.add_tokens(["<extra_0>", "<extra_1>"])
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    student = {"config": {"num_hidden_layers": 1, "vocab_size": len(tok)}, "init": "random", "tokenizer": str(folder)}
    summary = alignkd.distill(make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}], student=student))
    assert summary["steps"] == 3 and "eval_bpb" not in summary["student_eval"]


def test_a_student_tokenizer_that_cannot_spell_the_text_is_one_line(teacher, corpus, tmp_path):
    """A word-level tokenizer of a few words reads most of the corpus as [UNK], which no term can teach."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "truth": 3, "fortune": 4, "wife": 5}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    path = tmp_path / "student"
    AutoModelForCausalLM.from_config(tiny.config("llama", layers=1)).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "span_likelihood"}], student={"path": str(path)})
    _refused(cfg, r"student tokenizer: [\d.]+ % of the training text's student tokens are its unknown token '\[UNK\]'")
    assert not (tmp_path / "run" / "student").exists()


def test_a_trained_tokenizer_is_kept_by_what_it_was_trained_on(tmp_path):
    from alignkd.data.bpe import _fingerprint

    (tmp_path / "a.txt").write_text("some text")
    before = _fingerprint(str(tmp_path), 300, "text")
    assert _fingerprint(str(tmp_path), 400, "text") != before
    (tmp_path / "b.txt").write_text("more text")
    assert _fingerprint(str(tmp_path), 300, "text") != before
    # Dataset names on the hub (not local files) are told apart by name.
    assert _fingerprint("org/one", 300, "text") != _fingerprint("org/two", 300, "text")
