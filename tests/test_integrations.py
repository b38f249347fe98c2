"""``alignkd.integrations``: alignkd's terms inside a ``transformers.Trainer``.

The Trainer's first step must cost what ``alignkd distill``'s first step costs
on the same batch, the same weights and the same projector: both read the same
positions (every real one without labels; a leading BOS left out of the state
terms). With labels, the positions counted are those whose next token is a
target, so the CE term is then Hugging Face's own causal-LM loss. Whatever
cannot work inside a Trainer is refused in one line, and a bad term key gets
the line ``alignkd distill`` gives.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from alignkd import testing as tiny
from alignkd.config import load_config
from alignkd.engine.loop import next_batches
from alignkd.engine.step import micro_step, schedules_at
from alignkd.errors import ConfigError, DataError, ModelError
from alignkd.integrations import DistillCollator, DistillTrainer
from alignkd.integrations.trainer import SIDE_FILE
from tests.test_engine import NARROW, make_cfg, make_run

REPO = Path(__file__).resolve().parents[1]
LOSSES = [{"type": "kl", "temperature": 2.0}, {"type": "hidden", "projector": "linear"}, {"type": "ce", "weight": 0.5}]


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(use_cpu=True, report_to=[], max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3)
    return TrainingArguments(str(out), **{**base, **kw, "logging_steps": 1, "save_strategy": "no"})


def tiny_pair(**student):
    """An in-memory teacher (32 wide) and a narrower student, with the byte tokenizer."""
    return tiny.build("llama", width=32), tiny.build("llama", seed=1, **{"width": 16, **student}), tiny.byte_tokenizer()


# ---------------------------------------------------------------- the first step is alignkd distill's


@pytest.mark.parametrize("bos,weighting", [(False, "static"), (True, "uncertainty")])
def test_the_trainers_first_step_equals_alignkd_distills(corpus, tmp_path, bos, weighting):
    teacher_dir = tiny.save_model(tmp_path / "teacher", "llama", layers=2, width=32, bos=bos)
    run = make_run(make_cfg(teacher_dir, corpus, tmp_path / "run", losses=LOSSES, student=NARROW, weighting=weighting))
    assert run.cfg.data.bos == ("always" if bos else "never")
    run.unwrapped.student.save_pretrained(tmp_path / "student0")  # the weights both start from
    batch = next_batches(run, 0)[0]
    want = micro_step(run, batch, 1.0, schedules_at(run, 0), update_weights=False, sync=True)

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student0", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [r.tolist() for r in batch.input_ids]  # the engine's micro-batch as a 4-row dataset: one step each
    trainer = DistillTrainer(
        student, args(tmp_path / "hf"), teacher=teacher, losses=LOSSES, weighting={"strategy": weighting},
        train_dataset=rows, processing_class=tok,
    )  # fmt: skip
    assert trainer.meeting.side.load_state_dict(run.unwrapped.aux_state(), strict=False).unexpected_keys == []
    collated = trainer.data_collator(rows)
    assert torch.equal(collated["input_ids"], batch.input_ids)
    assert torch.equal(collated["attention_mask"].bool(), batch.mask)

    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    side_before = [p.detach().clone() for p in trainer.meeting.extra_parameters()]
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(want["loss"].item(), abs=1e-5)
    for name in ("kl", "hidden", "ce"):  # relative: hidden is ~6e-4 here, so a leading BOS counted shows only so
        assert first[f"loss/{name}"] == pytest.approx(want[name].item(), rel=1e-5), name
    steps = [r for r in trainer.state.log_history if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()), "student unchanged"
    projector = len(list(trainer.meeting.side.projectors.parameters()))
    assert projector and len(side_before) == projector + (weighting == "uncertainty")  # (+ the log-variances)
    for p0, p in zip(side_before, trainer.meeting.extra_parameters(), strict=True):
        assert not torch.equal(p0, p.detach()), "a projector or learned weight was not trained"


# ---------------------------------------------------------------- labels, saving, the collator


def test_gradient_accumulation_weighs_micro_batches_by_their_positions(tmp_path):
    # Rows of very different lengths, and a student head scaled up so that each position's loss differs: a mean of
    # micro-batch means would then differ from the mean over every position.
    rows = [list(range(5, 5 + n)) for n in (3, 30, 4, 25)]
    first = {}
    for accum in (1, 2):
        teacher, student, tok = tiny_pair()
        student.lm_head.weight.data *= 30
        trainer = DistillTrainer(
            student, args(tmp_path / str(accum), max_steps=1, per_device_train_batch_size=4 // accum,
                          gradient_accumulation_steps=accum),
            teacher=teacher, losses=LOSSES, train_dataset=rows, processing_class=tok,
        )  # fmt: skip
        trainer.train()
        first[accum] = trainer.state.log_history[0]["loss"]
    assert first[2] == pytest.approx(first[1], rel=5e-5)  # a mean of means is 2e-4 away


def test_with_labels_the_ce_term_is_hugging_faces_causal_lm_loss(tmp_path):
    teacher, student, tok = tiny_pair()
    trainer = DistillTrainer(student, args(tmp_path), teacher=teacher, losses=[{"type": "ce"}], processing_class=tok)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, 9, 10]},  # a masked prompt
        {"input_ids": [11, 12, 13]},
    ]
    inputs = DistillCollator(labels=True)(rows)
    assert inputs["labels"][1].tolist() == [11, 12, 13, -100, -100, -100]
    got = trainer.compute_loss(trainer.model.eval(), inputs)
    ref = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    assert got.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    # Without labels every real position counts: here more positions, so another mean.
    plain = trainer.compute_loss(trainer.model, {k: v for k, v in inputs.items() if k != "labels"})
    assert plain.item() != pytest.approx(got.item(), rel=1e-4)


def test_labels_other_than_the_next_ids_are_refused(tmp_path):
    teacher, student, tok = tiny_pair()
    trainer = DistillTrainer(student, args(tmp_path), teacher=teacher, losses=[{"type": "kl"}], processing_class=tok)
    inputs = DistillCollator(labels=True)([[5, 6, 7]])
    inputs["labels"][0, 1] = 99
    with pytest.raises(DataError, match="labels may only be the input_ids"):
        trainer.compute_loss(trainer.model, inputs)


def test_save_model_writes_a_student_transformers_loads_and_the_projectors(tmp_path):
    teacher, student, tok = tiny_pair()
    rows = [tok(tiny.TEXT[i : i + 40])["input_ids"] for i in range(0, 160, 40)]
    trainer = DistillTrainer(
        student, args(tmp_path / "out", max_steps=1), teacher=teacher, losses=LOSSES, train_dataset=rows,
        processing_class=tok,
    )  # fmt: skip
    trainer.train()
    assert trainer.evaluate(eval_dataset=rows)["eval_loss"] > 0  # the distillation loss, scored by prediction_step
    trainer.save_model(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    side = torch.load(tmp_path / "student" / SIDE_FILE, weights_only=True)["side"]
    assert sorted(side) == sorted(trainer.meeting.side.aux_state()) and side, "projector state not saved"


def _resumable(out: Path, rows, tok) -> DistillTrainer:
    teacher, student, _ = tiny_pair()
    a = args(out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2)
    a.save_strategy, a.save_steps = "steps", 2
    return DistillTrainer(
        student, a, teacher=teacher, losses=LOSSES[:2], weighting={"strategy": "uncertainty"}, train_dataset=rows,
        processing_class=tok,
    )  # fmt: skip


@pytest.mark.slow
def test_a_resumed_trainer_equals_an_uninterrupted_one(tmp_path):
    # The projectors and log-variances come back from alignkd_side.pt, their Adam state from the Trainer's
    # optimizer.pt, and their gradients start each step from zero (the Trainer zeroes only the model's).
    tok = tiny.byte_tokenizer()
    rows = [tok(tiny.TEXT[i : i + 30])["input_ids"] for i in range(0, 240, 30)]
    whole = _resumable(tmp_path / "a", rows, tok)
    whole.train()
    resumed = _resumable(tmp_path / "b", rows, tok)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert [r["loss"] for r in resumed.state.log_history[2:4]] == [r["loss"] for r in whole.state.log_history[2:4]]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for p, q in zip(whole.meeting.extra_parameters(), resumed.meeting.extra_parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "losses,weighting",
    [
        (LOSSES, "gradnorm"),
        (LOSSES, "ratio"),
        ([{"type": "kl"}, {"type": "attention", "layers": "last"}, {"type": "hidden", "layers": "adaptive"}], "static"),
    ],
    ids=["gradnorm", "ratio", "attention_adaptive"],
)
def test_other_weightings_and_terms_train(tmp_path, losses, weighting):
    teacher, student, tok = tiny_pair()
    rows = [tok(tiny.TEXT[i : i + 30])["input_ids"] for i in range(0, 120, 30)]
    trainer = DistillTrainer(
        student, args(tmp_path, max_steps=2), teacher=teacher, losses=losses, weighting={"strategy": weighting},
        train_dataset=rows, processing_class=tok,
    )  # fmt: skip
    w0 = trainer.meeting.weighting.weights().detach().clone()
    side0 = [p.detach().clone() for p in trainer.meeting.extra_parameters()]
    trainer.train()
    steps = [r for r in trainer.state.log_history if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(v) for r in steps for k, v in r.items() if k.startswith("loss"))
    if weighting != "static":
        assert not torch.equal(w0, trainer.meeting.weighting.weights().detach()), "the weights never updated"
    assert all(not torch.equal(a, b.detach()) for a, b in zip(side0, trainer.meeting.extra_parameters(), strict=True))


def test_a_lora_student_trains_its_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    teacher, student, tok = tiny_pair()
    student = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = [tok(tiny.TEXT[i : i + 30])["input_ids"] for i in range(0, 120, 30)]
    trainer = DistillTrainer(
        student, args(tmp_path, max_steps=2), teacher=teacher, losses=LOSSES, train_dataset=rows, processing_class=tok
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    changed = {k for k, v in student.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:3]


def test_the_collator_pads_on_the_right_and_masks_padding():
    c = DistillCollator(pad_id=3, max_length=4)
    out = c([[1, 2], {"input_ids": torch.tensor([4, 5, 6, 7, 8])}, {"input_ids": [9], "attention_mask": [1]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 3], [4, 5, 6, 7], [9, 3, 3, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert "labels" not in out
    with pytest.raises(DataError, match="row 1 has no input_ids"):
        c([[1], {"text": "hi"}])
    with pytest.raises(DataError, match="row 0 has no tokens"):
        c([[]])


# ---------------------------------------------------------------- refusals


def _message(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_bad_term_key_gets_alignkd_distills_line(teacher, corpus, tmp_path):
    bad = [{"type": "kl", "temprature": 2.0}]
    with pytest.raises(ConfigError) as cli:
        load_config(data=make_cfg(teacher, corpus, tmp_path, losses=bad))
    t, s, tok = tiny_pair()
    with pytest.raises(ConfigError) as ours:
        DistillTrainer(s, args(tmp_path), teacher=t, losses=bad, processing_class=tok)
    assert _message(ours) == _message(cli)
    assert "did you mean 'temperature'" in _message(ours)


def _full_config(teacher, corpus, tmp_path, **change) -> dict:
    cfg = make_cfg(teacher, corpus, tmp_path, losses=[{"type": "kl"}])
    for dotted, value in change.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    return cfg


@pytest.mark.parametrize(
    "change,expect",
    [
        ({"teacher__cache": "cache"}, "teacher.cache: not supported inside a transformers Trainer"),
        (
            {"generation__sources": {"dataset": 0.5, "student": 0.5}, "generation__prompt_tokens": 4},
            "generation.sources: not supported",
        ),
        (
            {"student__config": {"hidden_size": 16}, "student__from_teacher": None, "student__tokenizer": "tok"},
            "student.tokenizer / student.new_tokenizer: not supported",
        ),
    ],
    ids=["teacher_cache", "generation_sources", "student_tokenizer"],
)
def test_what_needs_alignkds_own_loop_is_refused(teacher, corpus, tmp_path, change, expect):
    t, s, tok = tiny_pair()
    cfg = _full_config(teacher, corpus, tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        DistillTrainer(s, args(tmp_path), teacher=t, config=cfg, processing_class=tok)
    assert expect in _message(e)


def test_a_whole_config_gives_its_losses_and_weighting(teacher, corpus, tmp_path):
    t, s, tok = tiny_pair()
    cfg = make_cfg(teacher, corpus, tmp_path, losses=LOSSES, weighting="uncertainty")
    trainer = DistillTrainer(s, args(tmp_path), teacher=t, config=cfg, processing_class=tok)
    assert [x.cfg.name for x in trainer.meeting.terms] == ["kl", "hidden", "ce"]
    assert type(trainer.meeting.weighting).__name__ == "Uncertainty"


def test_the_config_dataclasses_are_taken_as_the_dicts_are(tmp_path):
    from alignkd.config import WeightingConfig
    from alignkd.terms import TERM_TYPES

    t, s, tok = tiny_pair()
    kl, hidden = TERM_TYPES["kl"].config(type="kl", temperature=2.0), TERM_TYPES["hidden"].config(type="hidden")
    trainer = DistillTrainer(
        s, args(tmp_path), teacher=t, losses=[kl, hidden], weighting=WeightingConfig(strategy="ratio"),
        processing_class=tok,
    )  # fmt: skip
    assert [(x.cfg.name, x.cfg.temperature if x.cfg.type == "kl" else None) for x in trainer.meeting.terms] == [
        ("kl", 2.0),
        ("hidden", None),
    ]
    assert type(trainer.meeting.weighting).__name__ == "Ratio"
    assert kl.name is None  # the caller's config is left as it was


def test_span_terms_and_other_tokenizers_are_refused(tmp_path):
    t, s, tok = tiny_pair()
    with pytest.raises(ConfigError, match=re.escape("losses[0] (span_likelihood): compares two tokenizations")):
        DistillTrainer(s, args(tmp_path), teacher=t, losses=[{"type": "span_likelihood"}], processing_class=tok)
    with pytest.raises(ModelError, match="tokenizers differ"):
        DistillTrainer(s, args(tmp_path), teacher=t, losses=[{"type": "kl"}], processing_class=tok,
                       teacher_tokenizer=_renumbered(tok))  # fmt: skip


def _renumbered(tok):
    """The byte tokenizer with two ids swapped: same tokens, other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(tok.get_vocab())
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>")


def test_a_head_smaller_than_the_tokenizer_is_refused(tmp_path):
    t, s, tok = tiny_pair(vocab=200)
    with pytest.raises(ModelError) as e:
        DistillTrainer(s, args(tmp_path), teacher=t, losses=[{"type": "kl"}], processing_class=tok)
    assert "vocabulary mismatch: teacher head has 272 rows, student head 200" in _message(e)


# ---------------------------------------------------------------- the docs' script


def _docs_script() -> str:
    page = (REPO / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    return blocks[0]


def test_the_docs_show_the_example_script():
    assert _docs_script() == (REPO / "examples" / "distill_with_trainer.py").read_text()


@pytest.mark.slow
def test_the_example_script_runs(tmp_path):
    teacher = tiny.save_model(tmp_path / "teacher", "llama", width=32)
    student = tiny.save_model(tmp_path / "student", "llama", width=16, seed=1)
    text = tmp_path / "train.txt"
    text.write_text(tiny.TEXT * 4)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "distill_with_trainer.py"), str(teacher), str(student), str(text),
         str(out), "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 16
    assert (out / SIDE_FILE).is_file()


@pytest.mark.slow
def test_the_example_script_runs_over_two_ddp_processes(tmp_path):
    """The documented script under ``accelerate launch`` with two processes: the Trainer wraps the student in DDP,
    the projectors' gradients are averaged by the integration, and the main process saves."""
    import socket

    teacher = tiny.save_model(tmp_path / "teacher", "llama", width=32)
    student = tiny.save_model(tmp_path / "student", "llama", width=16, seed=1)
    text = tmp_path / "train.txt"
    text.write_text(tiny.TEXT * 4)
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
              str(port)]  # fmt: skip
    # ACCELERATE_USE_CPU: without GPUs, the Trainer joins CPU processes into one group only when told to use the
    # CPU (else each process trains alone). info: the Trainer's line with the global batch.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TRANSFORMERS_VERBOSITY": "info"}
    done = subprocess.run(
        [*launch, str(REPO / "examples" / "distill_with_trainer.py"), str(teacher), str(student), str(text),
         str(out), "2"],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # 8 rows per process, 2 processes: the Trainer really ran distributed
    assert re.search(
        r"Total train batch size \(w\. parallel, distributed & accumulation\) = 16", done.stderr + done.stdout
    )
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert saved.keys() == before.keys()
    assert any(not torch.equal(saved[k], before[k]) for k in saved), "two steps changed the student"
    assert (out / SIDE_FILE).is_file()
