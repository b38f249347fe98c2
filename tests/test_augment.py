"""Teacher-labelled rows for classification: augmented variants (TinyBERT-style) and unlabelled text.

A tiny llama classifier is the teacher and a tiny causal llama with the same
byte tokenizer proposes the replacements.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import _classification_jsonl, make_cfg, make_run

import alignkd
from alignkd import testing as tiny
from alignkd.align.tasks import TASKS, TEACHER_LABEL
from alignkd.data.rows import Rows
from alignkd.engine.augment import BATCH
from alignkd.errors import ConfigError
from alignkd.models.capture import Record
from alignkd.terms import TERM_TYPES, StepTensors


def test_rows_read_the_asked_rows_in_order_across_memory_and_disk(tmp_path):
    a = torch.arange(12).reshape(4, 3)
    np.save(tmp_path / "b.npy", np.arange(100, 118).reshape(6, 3))
    b = np.load(tmp_path / "b.npy", mmap_mode="r")
    rows = Rows(a, b)
    whole = torch.cat([a, torch.from_numpy(np.array(b))])
    assert rows.shape == (10, 3) and len(rows) == 10
    for idx in ([9, 0, 5, 5, 3], torch.tensor([7, 2]), [], list(range(10))):
        assert torch.equal(rows[idx], whole[torch.as_tensor(idx, dtype=torch.long)])
    assert torch.equal(rows[2:6], whole[2:6])
    with pytest.raises(IndexError):
        rows[[10]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    return {
        "teacher": tiny.save_model(root / "clf", "llama", task="sequence_classification", layers=2, num_labels=2),
        "lm": tiny.save_model(root / "lm", "llama", layers=1, seed=3),
        "data": _classification_jsonl(root / "train.jsonl", rows=24),
        "root": root,
    }


def _cfg(world, out: Path, **data) -> dict:
    cfg = make_cfg(
        world["teacher"],
        world["data"],
        out,
        losses=[{"type": "kl"}, {"type": "ce"}],
        task="sequence_classification",
        student={"config": {"num_hidden_layers": 1}},
        steps=2,
    )
    cfg["data"].update(seq_len=32, eval_fraction=0.25, **data)
    return cfg


def test_variants_replace_a_share_of_free_tokens_with_the_lms_candidates(world, tmp_path):
    run = make_run(_cfg(world, tmp_path / "run", augment=3, augment_lm=str(world["lm"]), augment_p=0.5, augment_k=4))
    train = run.train_data
    assert isinstance(train["input_ids"], Rows)
    n = train["input_ids"].parts[0].shape[0]
    assert len(train["input_ids"]) == n * 4  # the examples, then 3 variants of each
    assert n <= BATCH  # one batch of examples: variant v of example i is row n + v * n + i
    lm = tiny.AutoModelForCausalLM.from_pretrained(world["lm"]).eval()
    special = set(run.tokenizer.all_special_ids)
    changed = total = 0
    for v in range(3):
        for i in range(n):
            orig = train["input_ids"][[i]][0]
            mask = train["mask"][[i]][0]
            var = train["input_ids"][[n + v * n + i]][0]
            assert torch.equal(train["mask"][[n + v * n + i]][0], mask)
            diff = (var != orig).nonzero().flatten().tolist()
            with torch.no_grad():
                logits = lm(input_ids=orig[None], attention_mask=mask[None].long()).logits[0, :, : len(run.tokenizer)]
            for pos in diff:
                assert pos > 0 and mask[pos] and int(orig[pos]) not in special
                top = logits[pos - 1].topk(5).indices.tolist()  # k = 4, plus the original's place
                assert int(var[pos]) in top and var[pos] != orig[pos]
            free = mask.clone()
            free[0] = False
            changed, total = changed + len(diff), total + int(free.sum())
    assert changed / total == pytest.approx(0.5, abs=0.1)


def test_augmented_rows_carry_no_gold_label_and_the_step_takes_the_teachers_class(world, tmp_path):
    run = make_run(_cfg(world, tmp_path / "run", augment=2, augment_lm=str(world["lm"])))
    t = run.train_data
    n = t["input_ids"].parts[0].shape[0]
    extra = torch.arange(n, len(t["input_ids"]))
    assert (t["labels"][extra] == TEACHER_LABEL).all()  # the gold label does not hold for a changed text
    assert (t["labels"][torch.arange(n)] >= 0).all()
    # A batch of gold and teacher rows: the targets are the gold labels and the teacher's argmax.
    idx = torch.tensor([0, n, 1, n + 3])
    labels = t["labels"][idx]
    teacher_logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.1, 0.0], [4.0, 1.0]])
    x = StepTensors(
        t["input_ids"][idx],
        t["mask"][idx],
        labels,
        TASKS["sequence_classification"],
        Record(logits=torch.zeros(4, 2)),
        Record(logits=teacher_logits),
        vocab=2,
        side=None,
    )
    tgt, has = x.targets()
    assert tgt.tolist() == [int(labels[0]), 1, int(labels[2]), 0] and has.all()
    # ce on those rows is the cross-entropy against that mix of gold and teacher labels
    s = torch.randn(4, 2, requires_grad=True)
    x.student = Record(logits=s)
    got = TERM_TYPES["ce"].compute(None, x, None)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(s, tgt))
    # ... and where the teacher's head did not run, a clear error instead of a wrong label
    x.teacher = Record()
    with pytest.raises(ConfigError, match="labelled by the teacher's classes"):
        x.targets()


def test_teacher_labelled_rows_need_a_term_that_runs_the_teacher(world, tmp_path):
    cfg = _cfg(world, tmp_path / "run", augment=1, augment_lm=str(world["lm"]))
    cfg["losses"] = [{"type": "ce"}]
    with pytest.raises(ConfigError, match="data.augment: the teacher labels these rows in the step, and no term"):
        alignkd.distill(cfg)


def test_labelled_rows_are_made_once_and_reused(world, tmp_path, capsys):
    store = world["data"].parent / ".alignkd-augment"  # shared with the module's other tests
    before = {p.name for p in store.iterdir()} if store.exists() else set()
    cfg = _cfg(world, tmp_path / "a", augment=1, augment_lm=str(world["lm"]), unlabelled=str(world["data"]))
    alignkd.distill(cfg)
    said = " ".join(capsys.readouterr().err.split())
    assert "data.augment: making the rows" in said and "data.unlabelled: making the rows" in said
    made = sorted(p.name for p in store.iterdir() if p.is_dir() and p.name not in before)
    assert len(made) == 2
    cfg["train"]["output_dir"] = str(tmp_path / "b")
    alignkd.distill(cfg)
    said = " ".join(capsys.readouterr().err.split())
    assert "data.augment: reusing" in said and "data.unlabelled: reusing" in said
    assert sorted(p.name for p in store.iterdir() if p.is_dir() and p.name not in before) == made
    meta = [json.loads((store / m / "meta.json").read_text()) for m in made]
    assert {m["what"] for m in meta} == {"augment", "unlabelled"}


def test_a_classifier_without_an_lm_head_needs_augment_lm(world, tmp_path):
    with pytest.raises(ConfigError, match="data.augment_lm: the teacher is a classifier without a language-model"):
        make_run(_cfg(world, tmp_path / "run", augment=1))


def test_augmentation_is_for_classification(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}])
    cfg["data"]["augment"] = 2
    with pytest.raises(ConfigError, match="data.augment: the teacher labels these rows"):
        alignkd.distill(cfg)
