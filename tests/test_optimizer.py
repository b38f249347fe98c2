"""``train.optimizer``: AdamW, or Adafactor, whose factored state fits a large embedding."""

from __future__ import annotations

import pytest
import torch

import alignkd
from alignkd.backend.strategy import FSDP2, Backend, ZeRO
from alignkd.errors import ConfigError
from tests.test_engine import NARROW, make_cfg, make_run, read_metrics, resume_copy, student_weights


def _state_values(optimizer, p: torch.Tensor) -> int:
    return sum(v.numel() for v in optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0)


def test_adafactor_keeps_rows_plus_columns_for_a_matrix_where_adamw_keeps_two_copies(teacher, corpus, tmp_path):
    from alignkd.engine.step import optimizer_step

    counts = {}
    for name in ("adamw", "adafactor"):
        cfg = make_cfg(
            teacher, corpus, tmp_path / name, losses=[{"type": "kl"}], student=NARROW, optimizer=name, steps=1
        )
        run = make_run(cfg)
        optimizer_step(run, 0, [run.task.make_batch(run.train_data, torch.arange(4), run.tokenizer, 0)])
        emb = run.unwrapped.student.get_input_embeddings().weight
        inner = getattr(run.optimizer, "optimizer", run.optimizer)  # Accelerate's wrapper holds the torch optimizer
        counts[name] = _state_values(inner, emb)
        assert type(inner).__name__ == {"adamw": "AdamW", "adafactor": "Adafactor"}[name]
    v, d = emb.shape
    assert counts["adamw"] == 2 * v * d
    assert counts["adafactor"] == v + d


@pytest.mark.slow
def test_an_adafactor_run_trains_and_resumes_like_the_uninterrupted_run(teacher, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = make_cfg(
        teacher,
        corpus,
        a,
        losses=[{"type": "kl"}, {"type": "ce"}],
        student=NARROW,
        optimizer="adafactor",
        lr=1e-2,
        steps=4,
        save_every=2,
        keep_checkpoints=10,
    )
    alignkd.distill(cfg)
    rows_a, _ = read_metrics(a)
    assert rows_a[-1]["loss"] < rows_a[0]["loss"]
    resume_copy(a, b, cfg, 4)
    rows_b, _ = read_metrics(b)
    for ra, rb in zip(rows_a[2:], rows_b[4:], strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7)
    wa, wb = student_weights(a), student_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_an_unknown_optimizer_is_one_line(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}], optimizer="sgd")
    with pytest.raises(ConfigError, match=r"^train\.optimizer: 'sgd' is not one of adamw, adafactor"):
        alignkd.distill(cfg)


def test_the_sharding_back_ends_offer_adamw_only():
    # Adafactor is stepped by one process and by DDP; under FSDP2 and ZeRO it is untested, so it is refused.
    assert Backend.optimizers == ("adamw", "adafactor")
    assert FSDP2.optimizers == ZeRO.optimizers == ("adamw",)


def test_evaluation_scores_a_batch_a_few_rows_at_a_time_with_the_same_result(teacher, monkeypatch):
    """A large vocabulary's logits are made a few rows at a time: the held-out numbers do not change."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from alignkd.align import tasks

    model = AutoModelForCausalLM.from_pretrained(teacher)
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(3, 200, (10, 12), generator=g)}
    kw = {"batch_size": 4, "batches": 3, "device": "cpu", "autocast": contextlib.nullcontext}
    whole = tasks.heldout(tasks.TASKS["causal_lm"], model, data, None, **kw)
    assert tasks._eval_rows(tasks.TASKS["causal_lm"], model, tasks.Batch(data["input_ids"][:4], None)) == [slice(0, 4)]
    monkeypatch.setattr(tasks, "EVAL_LOGITS_BYTES", 1)  # one row per forward
    rows = tasks.heldout(tasks.TASKS["causal_lm"], model, data, None, **kw)
    assert rows["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-6)
    assert rows["eval_ppl"] == pytest.approx(whole["eval_ppl"], rel=1e-6)
