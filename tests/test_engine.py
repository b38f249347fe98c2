"""Integration tests of the distillation engine: short real runs on tiny models.

Each test drives ``alignkd.distill`` (or ``alignkd.engine.setup.setup`` and the loop
pieces) on offline tiny models from ``alignkd.testing`` and checks what a run wrote or
what the step did: every loss type and weighting logs finite values, every
model family distils and saves a student that transformers reloads, projectors
appear exactly when widths differ, block-wise KD trains the student but never
the teacher, GradNorm weights move and stay normalised, a resumed run equals an
uninterrupted one, gradient accumulation equals one big batch, padded vocab
heads meet on their shared ids, and mismatched tokenizers are refused.

Everything runs on CPU in seconds: width 16-32, 1-2 blocks, 16-token blocks,
2-6 steps.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

import alignkd
from alignkd import testing as tiny
from alignkd.config import load_config
from alignkd.engine.block_choice import choose_blocks
from alignkd.engine.load import fused_heads
from alignkd.engine.loop import next_batches, train
from alignkd.engine.setup import setup
from alignkd.engine.step import schedules_at, term_losses
from alignkd.errors import ConfigError
from alignkd.losses import KL_KINDS

# A student narrower than the 32-wide tiny teacher: every feature term needs a projector.
NARROW = {"config": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}}
# The teacher's block 1 as a one-block student of the teacher's width.
DEPTH = {"from_teacher": {"layers": [1]}}
TYPES = ("ce", "kl", "dkd", "hidden", "attention", "relation", "contrastive", "blockwise")


# ---------------------------------------------------------------- fixtures and helpers


# ``teacher`` and ``corpus``: module fixtures in conftest.py, shared with test_cache.py and test_finetune.py.


def make_cfg(
    teacher: Path, data: Path, out: Path, *, losses, student=None, task="causal_lm", weighting="static", **train
) -> dict:
    """A complete run config as a plain dict: fast, deterministic, fp32, no progress bar."""
    return {
        "teacher": {"path": str(teacher), "task": task, "dtype": "float32"},
        "student": copy.deepcopy(student or DEPTH),
        "data": {"train": str(data), "seq_len": 16, "eval_fraction": 0.1},
        "losses": copy.deepcopy(losses),
        "weighting": {"strategy": weighting} if isinstance(weighting, str) else dict(weighting),
        "train": {
            "steps": 3,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup": 0,
            "mixed_precision": "no",
            "progress": False,
            "eval_every": 0,
            "eval_batches": 1,
            "output_dir": str(out),
            **train,
        },
    }


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of ``out/metrics.jsonl``, in file order."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "eval"]


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def check_logged(out: Path, names: list[str], steps: int) -> list[dict]:
    """Every step logged once with finite, positive-weighted values for exactly ``names``; an eval at the end."""
    rows, evals = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        logged = sorted(k[len("loss/") :] for k in r if k.startswith("loss/"))
        assert logged == sorted(names), f"step {r['step']}: logged terms {logged}, configured {names}"
        for n in names:
            assert finite(r[f"loss/{n}"]), f"step {r['step']}: loss/{n} = {r[f'loss/{n}']}"
            assert finite(r[f"w/{n}"]) and r[f"w/{n}"] > 0, f"step {r['step']}: w/{n} = {r[f'w/{n}']}"
        for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
            assert finite(r[key]), f"step {r['step']}: {key} = {r.get(key)}"
        # A gradient reached the trainable side from the terms.
        assert r["grad_norm"] > 0, f"step {r['step']}: grad_norm is 0"
    assert evals and evals[-1]["step"] == steps and finite(evals[-1]["eval_loss"])
    return rows


def term_names(losses: list[dict]) -> list[str]:
    """The names the config gives the terms: the type, suffixed _2, _3, ... when it repeats."""
    seen: dict[str, int] = {}
    names = []
    for loss in losses:
        seen[loss["type"]] = seen.get(loss["type"], 0) + 1
        names.append(loss["type"] if seen[loss["type"]] == 1 else f"{loss['type']}_{seen[loss['type']]}")
    return names


def make_run(cfg: dict):
    """``alignkd.engine.setup.setup`` of a config dict, as ``distill`` would start it."""
    c = load_config(data=copy.deepcopy(cfg))
    Path(c.train.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(c.train.seed)
    acc = Accelerator(mixed_precision="no")
    _, inputs = choose_blocks(c, acc, say=lambda msg: None)  # as distill does, before the set-up
    return setup(c, acc, say=lambda msg: None, inputs=inputs)


def resume_copy(a: Path, b: Path, cfg: dict, last: int, **kw) -> dict:
    """Copy the finished run ``a`` to ``b`` less its step-``last`` checkpoint and its exported student, and resume it
    there (``kw``: ``alignkd.distill``'s); returns the resumed run's summary."""
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / f"step-{last}")
    shutil.rmtree(b / "student")
    cfg["train"]["output_dir"] = str(b)
    return alignkd.distill(cfg, resume=True, **kw)


def student_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def check_reloads(out: Path, cls, num_layers: int) -> None:
    """The saved student loads with transformers, has ``num_layers`` blocks, gives finite logits,
    and holds the trained weights of the last checkpoint."""
    model = cls.from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == num_layers
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    side = load_file(str(ckpts[-1] / "side.safetensors"))
    state = model.state_dict()
    shared = [k for k in side if k.startswith("student.") and k[len("student.") :] in state]
    assert len(shared) >= 0.8 * len(state), f"only {len(shared)} of {len(state)} student tensors are in the checkpoint"
    for k in shared:
        torch.testing.assert_close(state[k[len("student.") :]], side[k], msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------- every loss type, every weighting


ALL_TERMS = [
    {"type": "ce", "weight": 0.5},
    {"type": "kl", "temperature": 2.0},
    {"type": "dkd"},
    {"type": "hidden"},
    {"type": "attention"},
    {"type": "relation"},
    {"type": "contrastive", "max_tokens": 32},
    {"type": "blockwise", "layers": [[0, 0]]},
]


@pytest.mark.parametrize("strategy", ["static", "gradnorm", "uncertainty"])
def test_all_terms_under_each_weighting(teacher, corpus, tmp_path, strategy):
    """All eight term types at once, on a narrower student (projectors everywhere), under each strategy."""
    assert sorted(t["type"] for t in ALL_TERMS) == sorted(TYPES)
    cfg = make_cfg(teacher, corpus, tmp_path / "out", losses=ALL_TERMS, student=NARROW, weighting=strategy)
    summary = alignkd.distill(cfg)
    rows = check_logged(tmp_path / "out", list(TYPES), steps=3)
    assert set(summary) >= {
        "steps",
        "teacher_params",
        "student_params",
        "teacher_eval",
        "student_eval",
        "last_train",
        "student_dir",
    }
    assert summary["last_train"]["step"] == 3 and summary["student_params"] < summary["teacher_params"]
    if strategy != "static":
        # The dynamic strategies actually change the weights.
        assert any(rows[-1][f"w/{n}"] != rows[0][f"w/{n}"] for n in TYPES)


PER_TYPE = {
    "ce": [{"type": "ce"}],
    "kl": [{"type": "kl", "kind": k, "temperature": 2.0} for k in KL_KINDS],
    "dkd": [{"type": "dkd", "alpha": 1.0, "beta": 8.0}],
    "hidden": [{"type": "hidden", "metric": m} for m in ("mse", "cosine", "standardized")],
    "hidden-adaptive": [{"type": "hidden", "metric": "cosine", "layers": "adaptive"}],
    "attention": [{"type": "attention"}],
    "relation": [
        {"type": "relation", "of": ["q", "k", "v"]},
        {"type": "relation", "of": ["v"], "num_relation_heads": 2},
    ],
    "contrastive": [{"type": "contrastive", "max_tokens": 24, "symmetric": True}],
    "blockwise": [{"type": "blockwise", "kind": "forward"}, {"type": "blockwise", "kind": "jsd"}],
}


@pytest.mark.parametrize("kind", list(PER_TYPE))
def test_each_term_type_alone(teacher, corpus, tmp_path, kind):
    """Each type on its own (with every KL kind, every hidden metric and adaptive layers) trains the
    student, on a same-width student: only an adaptive mixture writes projectors.safetensors."""
    assert {t["type"] for terms in PER_TYPE.values() for t in terms} == set(TYPES)
    losses = PER_TYPE[kind]
    out = tmp_path / "out"
    alignkd.distill(make_cfg(teacher, corpus, out, losses=losses, steps=2))
    check_logged(out, term_names(losses), steps=2)
    adaptive = any(t.get("layers") == "adaptive" for t in losses)
    assert (out / "projectors.safetensors").exists() == adaptive
    if adaptive:
        keys = list(load_file(str(out / "projectors.safetensors")))
        assert keys and all(k.startswith("mixes.") for k in keys), keys


# ---------------------------------------------------------------- families


def _classification_jsonl(path: Path, rows: int = 40) -> Path:
    sentences = [s.strip() for s in tiny.TEXT.replace(",", ".").split(".") if s.strip()]
    with path.open("w") as f:
        for i in range(rows):
            label = "pos" if i % 2 else "neg"
            text = f"{sentences[i % len(sentences)]} {'good' if label == 'pos' else 'bad'} {i}"
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "bert"])
def test_family_distils_and_saves_a_student_that_reloads(tmp_path, corpus, family):
    """Each family's hooks (block outputs, q/k/v or GPT-2's fused c_attn, attention
    probabilities, the block-output swap of block-wise KD) work, and the saved
    one-block student reloads with the trained weights."""
    task = "sequence_classification" if family == "bert" else "causal_lm"
    t = tiny.save_model(tmp_path / "teacher", family, task=task, layers=2, width=32)
    data = _classification_jsonl(tmp_path / "train.jsonl") if task != "causal_lm" else corpus
    losses = [
        {"type": "kl"},
        {"type": "ce"},
        {"type": "hidden"},
        {"type": "relation"},
        {"type": "attention"},
        {"type": "blockwise"},
    ]
    out = tmp_path / "out"
    cfg = make_cfg(t, data, out, losses=losses, task=task)
    if task != "causal_lm":
        cfg["data"]["seq_len"] = 32
    summary = alignkd.distill(cfg)
    check_logged(out, term_names(losses), steps=3)
    assert ("eval_accuracy" if task != "causal_lm" else "eval_ppl") in summary["student_eval"]
    assert not (out / "projectors.safetensors").exists()  # same width: nothing to project
    cls = AutoModelForSequenceClassification if task != "causal_lm" else AutoModelForCausalLM
    check_reloads(out, cls, num_layers=1)


# ---------------------------------------------------------------- projectors


def test_narrow_student_gets_one_projector_per_mapped_layer(teacher, corpus, tmp_path):
    losses = [
        {"type": "kl"},
        {"type": "hidden", "layers": "auto"},  # student blocks 0 and 1
        {"type": "contrastive", "layers": [[1, 1]], "max_tokens": 32},  # student block 1
    ]
    out = tmp_path / "out"
    alignkd.distill(make_cfg(teacher, corpus, out, losses=losses, student=NARROW, steps=2))
    check_logged(out, ["kl", "hidden", "contrastive"], steps=2)
    proj = load_file(str(out / "projectors.safetensors"))
    modules = {k.split(".")[1] for k in proj}
    assert modules == {"hidden__0", "hidden__1", "contrastive__1"}, sorted(proj)
    assert all(k.startswith("projectors.") for k in proj), sorted(proj)
    for m in modules:
        assert proj[f"projectors.{m}.linear.weight"].shape == (32, 16)  # [D_teacher, D_student]
    # The student itself is saved without them.
    assert not any("projector" in k for k in student_weights(out))


def test_equal_widths_write_no_projectors(teacher, corpus, tmp_path):
    out = tmp_path / "out"
    alignkd.distill(
        make_cfg(teacher, corpus, out, losses=[{"type": "kl"}, {"type": "hidden"}, {"type": "contrastive"}], steps=2)
    )
    assert (out / "student" / "model.safetensors").exists()
    assert not (out / "projectors.safetensors").exists()


# ---------------------------------------------------------------- the teacher stays frozen


def test_setup_freezes_the_teacher(teacher, corpus, tmp_path):
    run = make_run(make_cfg(teacher, corpus, tmp_path / "out", losses=[{"type": "kl"}, {"type": "attention"}]))
    assert not any(p.requires_grad for p in run.teacher.model.parameters())
    assert not run.teacher.model.training and not any(m.training for m in run.teacher.model.modules())
    assert all(p.requires_grad for p in run.unwrapped.student.parameters())
    assert run.unwrapped.student.training


def test_blockwise_trains_student_and_projector_never_the_teacher(teacher, corpus, tmp_path):
    # Student block 0 (width 16), projected to 32, replaces teacher block 0's output;
    # teacher block 1, final norm and head then run on it.
    losses = [{"type": "blockwise", "layers": [[0, 0]]}, {"type": "kl"}]
    run = make_run(make_cfg(teacher, corpus, tmp_path / "out", losses=losses, student=NARROW, steps=2))
    before = {k: v.detach().clone() for k, v in run.teacher.model.state_dict().items()}

    batch = next_batches(run, 0)[0]
    t_rec = run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused)
    s_rec = run.side(batch.input_ids, batch.mask)
    losses_now = term_losses(run, batch, s_rec, t_rec, schedules_at(run, 0).temperatures)
    loss = losses_now["blockwise"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()

    proj = run.unwrapped.projector("blockwise", 0)
    assert proj is not None and proj.linear.weight.grad is not None and proj.linear.weight.grad.abs().sum() > 0
    student = run.unwrapped.student
    q0 = student.model.layers[0].self_attn.q_proj.weight.grad
    assert q0 is not None and q0.abs().sum() > 0, "no gradient reached student block 0"
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
    with_grad = [n for n, p in run.teacher.model.named_parameters() if p.grad is not None]
    assert not with_grad, f"teacher parameters got gradients: {with_grad[:3]}"
    run.optimizer.zero_grad(set_to_none=True)

    student_before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    train(run)
    after = run.teacher.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"training changed teacher weights: {changed[:3]}"
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert not any(p.requires_grad for p in run.teacher.model.parameters())


# ---------------------------------------------------------------- weighting over a run


def test_gradnorm_weights_move_stay_positive_and_sum_to_the_number_of_terms(teacher, corpus, tmp_path):
    losses = [{"type": "kl"}, {"type": "ce"}, {"type": "hidden"}]
    out = tmp_path / "out"
    alignkd.distill(
        make_cfg(teacher, corpus, out, losses=losses, weighting={"strategy": "gradnorm", "lr": 0.05}, steps=6)
    )
    rows = check_logged(out, ["kl", "ce", "hidden"], steps=6)
    w = torch.tensor([[r[f"w/{n}"] for n in ("kl", "ce", "hidden")] for r in rows], dtype=torch.float64)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.full((len(rows),), 3.0, dtype=torch.float64), atol=1e-4, rtol=0)
    steps_apart = (w[1:] - w[:-1]).abs().max(1).values
    assert (steps_apart > 1e-4).all(), f"weights did not move every step: {w.tolist()}"
    assert (w[-1] - w[0]).abs().max() > 1e-2, f"weights barely moved over the run: {w.tolist()}"


# ---------------------------------------------------------------- resume


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(teacher, corpus, tmp_path):
    # Gradnorm (its own optimizer and state) and contrastive sampling (the global RNG)
    # make the run depend on every piece of state a checkpoint must carry.
    losses = [{"type": "kl"}, {"type": "ce"}, {"type": "hidden"}, {"type": "contrastive", "max_tokens": 24}]
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = make_cfg(
        teacher,
        corpus,
        a,
        losses=losses,
        student=NARROW,
        weighting="gradnorm",
        steps=6,
        save_every=3,
        keep_checkpoints=10,
    )
    alignkd.distill(cfg)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step-3", "step-6"]

    summary = resume_copy(a, b, cfg, 6, overrides=["train.steps=6"])
    assert summary["last_train"]["step"] == 6

    rows_a, _ = read_metrics(a)
    rows_b, _ = read_metrics(b)
    # The copied log holds steps 1..6 of run a; the resumed run appended 4..6.
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    for ra, rb in zip(rows_a[3:], rows_b[6:], strict=True):
        for k in ("loss", "loss/kl", "loss/ce", "loss/hidden", "loss/contrastive", "w/kl", "lr"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), f"step {ra['step']} {k}: {rb[k]} vs {ra[k]}"
    wa, wb = student_weights(a), student_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), (
            f"{k} differs after resume (max {(wa[k] - wb[k]).abs().max():.3g})"
        )
    pa, pb = load_file(str(a / "projectors.safetensors")), load_file(str(b / "projectors.safetensors"))
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-5), f"{k} differs after resume"


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_grad_accumulation_equals_one_big_batch(teacher, corpus, tmp_path, task):
    """4 x 2 micro-batches and 8 x 1 see the same 8 blocks: same loss, same gradient, same step.

    Causal LM normalises by counted tokens, classification by examples (padded
    rows of different lengths; dropout off so both runs draw nothing random)."""
    if task == "causal_lm":
        t, data = teacher, corpus
        losses = [{"type": "kl"}, {"type": "ce", "weight": 0.5}, {"type": "hidden"}, {"type": "relation"}]
    else:
        t = tiny.save_model(
            tmp_path / "bert", "bert", task=task, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        data = _classification_jsonl(tmp_path / "train.jsonl")
        losses = [{"type": "kl"}, {"type": "ce", "weight": 0.5}, {"type": "dkd"}]
    names = term_names(losses)
    runs = {}
    for bs, accum in ((4, 2), (8, 1)):
        out = tmp_path / f"bs{bs}"
        cfg = make_cfg(
            t, data, out, losses=losses, task=task, steps=1, batch_size=bs, grad_accum=accum, max_grad_norm=1e6
        )
        cfg["data"]["seq_len"] = 32 if task != "causal_lm" else 16
        if bs == 8:
            init = {k: v.detach().clone() for k, v in make_run(cfg).unwrapped.student.state_dict().items()}
        alignkd.distill(cfg)
        runs[bs] = (read_metrics(out)[0][0], student_weights(out))
    (r4, w4), (r8, w8) = runs[4], runs[8]
    for k in ["loss"] + [f"loss/{n}" for n in names]:
        assert r4[k] == pytest.approx(r8[k], rel=1e-4, abs=1e-7), f"{k}: accumulated {r4[k]} vs one batch {r8[k]}"
    # The gradient norm is the test of the normalisation (an AdamW step is scale-free).
    assert r4["grad_norm"] == pytest.approx(r8["grad_norm"], rel=1e-3), (r4["grad_norm"], r8["grad_norm"])
    assert w4.keys() == w8.keys()
    diff = torch.cat([(w4[k] - w8[k]).flatten() for k in w8])
    update = torch.cat([(w8[k] - init[k]).flatten() for k in w8 if k in init])
    assert update.norm() > 0
    # AdamW's first update is ~lr * sign(g): only coordinates with a near-zero gradient may differ.
    assert diff.norm() < 0.01 * update.norm(), (
        f"weights after one step differ: {diff.norm():.3g} vs update {update.norm():.3g}"
    )


# ---------------------------------------------------------------- vocabularies and tokenizers


def test_padded_student_vocab_meets_the_teacher_on_shared_ids(teacher, corpus, tmp_path):
    student = {"config": {"num_hidden_layers": 1, "vocab_size": 288}}
    losses = [{"type": "kl"}, {"type": "ce"}, {"type": "dkd"}, {"type": "blockwise"}]
    cfg = make_cfg(teacher, corpus, tmp_path / "out", losses=losses, student=student, steps=2)
    run = make_run(cfg)
    assert run.vocab == tiny.VOCAB == 272
    assert run.unwrapped.student.get_output_embeddings().weight.shape[0] == 288
    summary = alignkd.distill(cfg)
    check_logged(tmp_path / "out", ["kl", "ce", "dkd", "blockwise"], steps=2)
    assert finite(summary["student_eval"]["eval_loss"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "student").config.vocab_size == 288


def _word_level_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "truth": 3, "fortune": 4, "wife": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def test_student_path_with_another_tokenizer_refuses_a_token_level_term(teacher, corpus, tmp_path):
    path = tmp_path / "student"
    AutoModelForCausalLM.from_config(tiny.config("llama", layers=1)).save_pretrained(path)
    _word_level_tokenizer().save_pretrained(path)
    cfg = make_cfg(teacher, corpus, tmp_path / "out", losses=[{"type": "kl"}], student={"path": str(path)})
    with pytest.raises(ConfigError) as e:
        alignkd.distill(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "tokenizer is not the teacher's" in msg and "span_likelihood" in msg, msg
    assert not (tmp_path / "out" / "student").exists()


def interrupt_then_resume(cfg: dict, a: Path, b: Path, undo) -> None:
    """Run ``cfg`` into ``b`` until the patched code interrupts it once step 3 is applied,
    ``undo`` the patch, resume: the student must equal the uninterrupted run in ``a``."""
    with pytest.raises(KeyboardInterrupt):
        alignkd.distill(cfg)
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-3"]
    undo()
    assert alignkd.distill(cfg, resume=True)["last_train"]["step"] == 6
    wa, wb = student_weights(a), student_weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), f"{k} differs after an interrupt and resume"


def test_an_interrupt_saves_the_finished_steps_and_resume_completes_the_run(teacher, corpus, tmp_path, monkeypatch):
    # Ctrl-C in step 4 of 6: steps 1-3 are kept in a checkpoint, and resuming gives
    # the same student as a run that was never interrupted.
    import alignkd.engine.step as step_mod

    losses = [{"type": "kl"}, {"type": "hidden"}]
    a, b = tmp_path / "a", tmp_path / "b"
    alignkd.distill(make_cfg(teacher, corpus, a, losses=losses, steps=6))

    real, calls = step_mod.term_losses, {"n": 0}

    def interrupt_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(step_mod, "term_losses", interrupt_in_step_4)
    cfg = make_cfg(teacher, corpus, b, losses=losses, steps=6)
    interrupt_then_resume(cfg, a, b, lambda: monkeypatch.setattr(step_mod, "term_losses", real))


def test_an_interrupt_after_the_optimizer_step_does_not_replay_the_step(teacher, corpus, tmp_path, monkeypatch):
    # Ctrl-C during step 3's evaluation, after its optimizer step: the checkpoint is
    # step 3 with the data position after it, and the resumed run equals one never
    # interrupted (a replayed step 3 would apply its batches twice).
    from alignkd.engine.setup import Run

    losses = [{"type": "kl"}, {"type": "ce"}]
    a, b = tmp_path / "a", tmp_path / "b"
    alignkd.distill(make_cfg(teacher, corpus, a, losses=losses, steps=6, eval_every=3))
    real, calls = Run.evaluate, {"n": 0}

    def interrupt_second_evaluation(self, model):
        calls["n"] += 1  # 1: the teacher before training; 2: the student after step 3
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, model)

    monkeypatch.setattr(Run, "evaluate", interrupt_second_evaluation)
    cfg = make_cfg(teacher, corpus, b, losses=losses, steps=6, eval_every=3)
    interrupt_then_resume(cfg, a, b, lambda: monkeypatch.setattr(Run, "evaluate", real))


def test_a_leading_bos_is_left_out_of_the_state_terms_only(corpus, tmp_path):
    # BOS states are attention-sink outliers: hidden-state terms skip that position;
    # the output terms keep it, since its logits predict the block's first token.
    from alignkd import losses as L

    teacher = tiny.save_model(tmp_path / "teacher", "llama", layers=2, width=32, bos=True)
    losses = [{"type": "hidden", "layers": [[0, 1]]}, {"type": "kl"}]
    run = make_run(
        make_cfg(teacher, corpus, tmp_path / "out", losses=losses, fused_head=False)
    )  # logits to compare with
    assert run.cfg.data.bos == "always"
    batch = next_batches(run, 0)[0]
    assert (batch.input_ids[:, 0] == run.tokenizer.bos_token_id).all()
    t_rec = run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused)
    s_rec = run.side(batch.input_ids, batch.mask)
    got = term_losses(run, batch, s_rec, t_rec, schedules_at(run, 0).temperatures)
    after_bos = batch.mask.clone()
    after_bos[:, 0] = False
    want_hidden = L.hidden_mse(s_rec.hidden[0], t_rec.hidden[1], after_bos)
    with_bos = L.hidden_mse(s_rec.hidden[0], t_rec.hidden[1], batch.mask)
    want_kl = L.kl_div(s_rec.logits[..., : run.vocab], t_rec.logits[..., : run.vocab], batch.mask)
    assert got["hidden"].item() == pytest.approx(want_hidden.item(), rel=1e-6)
    assert got["hidden"].item() != pytest.approx(with_bos.item(), rel=1e-6)
    assert got["kl"].item() == pytest.approx(want_kl.item(), rel=1e-6)


# ---------------------------------------------------------------- the fused LM head


@pytest.mark.parametrize(
    "family,extra", [("llama", {}), ("gemma3", {"final_logit_softcapping": 5.0}), ("gpt2", {}), ("qwen2", {})]
)
def test_fused_head_terms_equal_the_logit_terms(corpus, tmp_path, family, extra):
    """kl and ce through the heads in chunks: same values and same student gradients as on full logits."""
    teacher = tiny.save_model(tmp_path / "teacher", family, layers=2, width=32, **extra)
    losses = [{"type": "kl", "kind": "jsd", "temperature": 2.0}, {"type": "ce"}, {"type": "hidden"}]
    grads, values = {}, {}
    for fused in (True, False):
        run = make_run(make_cfg(teacher, corpus, tmp_path / f"out{fused}", losses=losses, fused_head=fused))
        assert run.unwrapped.fused is fused and run.unwrapped.fused is fused
        batch = next_batches(run, 0)[0]
        t_rec = run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused)
        s_rec = run.side(batch.input_ids, batch.mask)
        assert (s_rec.logits is None and t_rec.logits is None) is fused
        got = term_losses(run, batch, s_rec, t_rec, schedules_at(run, 0).temperatures)
        sum(got.values()).backward()
        values[fused] = {k: v.item() for k, v in got.items()}
        grads[fused] = {n: p.grad.clone() for n, p in run.unwrapped.student.named_parameters() if p.grad is not None}
    for k in values[False]:
        assert values[True][k] == pytest.approx(values[False][k], rel=1e-5), k
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(
            grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6 * grads[False][n].abs().max().item() + 1e-9, msg=n
        )


def test_fused_kl_and_ce_share_one_walk_and_extra_terms_walk_alone(corpus, teacher, tmp_path, monkeypatch):
    """With several KL and CE terms, the first KL and the first CE come from one lm_head_kl_ce call
    (at the KL's temperature; the CE at temperature 1), the others from their own calls: every value
    and every student gradient as on full logits."""
    losses = [
        {"type": "ce"},
        {"type": "kl", "kind": "jsd", "temperature": 2.0},
        {"type": "kl", "kind": "forward", "temperature": 1.5},
        {"type": "ce", "weight": 0.5},
    ]
    calls = count_head_losses(monkeypatch)
    grads, values = {}, {}
    for fused in (True, False):
        calls.clear()
        run = make_run(make_cfg(teacher, corpus, tmp_path / f"out{fused}", losses=losses, fused_head=fused))
        assert run.unwrapped.fused is fused
        batch = next_batches(run, 0)[0]
        got = term_losses(
            run,
            batch,
            run.side(batch.input_ids, batch.mask),
            run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused),
            [None, 2.0, 1.5, None],
        )
        sum(got.values()).backward()
        values[fused] = {k: v.item() for k, v in got.items()}
        grads[fused] = {n: p.grad.clone() for n, p in run.unwrapped.student.named_parameters() if p.grad is not None}
        want = {"lm_head_kl_ce": 1, "lm_head_kl": 1, "lm_head_ce": 1} if fused else {}
        assert calls == want, calls
    assert values[True].keys() == {"ce", "kl", "kl_2", "ce_2"}
    for k in values[False]:
        assert values[True][k] == pytest.approx(values[False][k], rel=1e-5), k
    assert values[True]["ce"] == values[True]["ce_2"] and values[True]["kl"] != values[True]["kl_2"]
    for n in grads[False]:
        torch.testing.assert_close(
            grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6 * grads[False][n].abs().max().item() + 1e-9, msg=n
        )


def count_head_losses(monkeypatch) -> dict[str, int]:
    """Calls of the LM-head losses (as the terms make them, through ``alignkd.losses``), by name."""
    calls: dict[str, int] = {}
    for name in ("lm_head_kl", "lm_head_ce", "lm_head_kl_ce", "lm_head_sparse_kl"):
        real = getattr(alignkd.losses, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(alignkd.losses, name, counted)
    return calls


# (mixed precision, weighting, tolerance of the logged values, of the weights' change): float32 agrees
# to rounding; under bf16 autocast the fused walk and the logits round the head gradient apart.
KL_CE_RUNS = [("no", "static", 1e-5, 1e-4), ("no", "gradnorm", 1e-5, 1e-4), ("bf16", "static", 1e-3, 0.05)]


@pytest.fixture
def accelerate_reset():
    """Accelerate's process-wide state back to unset after the test: a bf16 ``distill`` leaves it
    at bf16, and ``make_run``'s ``Accelerator(mixed_precision="no")`` would then refuse to start."""
    yield
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.mark.usefixtures("accelerate_reset")
@pytest.mark.parametrize("precision,weighting,value_rel,weight_rel", KL_CE_RUNS)
def test_a_kl_and_ce_run_fused_equals_the_run_on_logits(
    corpus, teacher, tmp_path, monkeypatch, precision, weighting, value_rel, weight_rel
):
    """A few steps of KL + CE (2 micro-batches each) with fused_head on and off: the same logged
    values and weights, and fused, one lm_head_kl_ce call per micro-batch and no other head loss."""
    losses = [{"type": "kl", "temperature": 2.0}, {"type": "ce", "weight": 0.5}, {"type": "hidden"}]
    calls = count_head_losses(monkeypatch)
    runs = {}
    for fused in (True, False):
        calls.clear()
        out = tmp_path / f"fused{fused}"
        cfg = make_cfg(
            teacher,
            corpus,
            out,
            losses=losses,
            student=NARROW,
            weighting=weighting,
            fused_head=fused,
            mixed_precision=precision,
            steps=3,
            batch_size=2,
            grad_accum=2,
        )
        if precision == "bf16":
            cfg["teacher"]["dtype"] = "bfloat16"
        if fused:
            init = {k: v.detach().clone() for k, v in make_run(cfg).unwrapped.student.state_dict().items()}
            calls.clear()
        alignkd.distill(cfg)
        assert calls == ({"lm_head_kl_ce": 3 * 2} if fused else {}), (fused, calls)
        runs[fused] = (read_metrics(out)[0], student_weights(out))
    (rows_f, w_f), (rows_l, w_l) = runs[True], runs[False]
    keys = ["loss", "loss/kl", "loss/ce", "loss/hidden", "w/kl", "w/ce", "grad_norm"]
    for a, b in zip(rows_f, rows_l, strict=True):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=value_rel, abs=1e-7), (a["step"], k, a[k], b[k])
    assert w_f.keys() == w_l.keys()
    diff = torch.cat([(w_f[k] - w_l[k]).flatten() for k in w_l])
    update = torch.cat([(w_l[k] - init[k]).flatten() for k in w_l if k in init])
    assert update.norm() > 0
    assert diff.norm() < weight_rel * update.norm(), (diff.norm().item(), update.norm().item())


def test_terms_that_need_logits_keep_them(corpus, teacher, tmp_path):
    for losses in ([{"type": "dkd"}], [{"type": "kl"}, {"type": "blockwise"}]):
        run = make_run(make_cfg(teacher, corpus, tmp_path / "out", losses=losses))
        assert not run.unwrapped.fused
    # Under autocast a run fuses when its output terms take one walk over the student's head (its
    # matmuls in bf16): one term, or a KL and a CE sharing theirs; more walks keep the logits.
    for losses, fused in (
        ([{"type": "kl"}, {"type": "hidden"}], True),
        ([{"type": "ce"}, {"type": "kl"}], True),
        ([{"type": "kl"}, {"type": "ce"}, {"type": "kl", "temperature": 2.0}], False),
        ([{"type": "ce"}, {"type": "ce", "weight": 0.5}], False),
    ):
        run = make_run(make_cfg(teacher, corpus, tmp_path / "out", losses=losses, mixed_precision="bf16"))
        assert run.unwrapped.fused is fused, losses
    # From a teacher cache the KL is lm_head_sparse_kl, which walks alone: with a CE, two walks.
    run = make_run(make_cfg(teacher, corpus, tmp_path / "out", losses=[{"type": "kl"}, {"type": "ce"}]))
    cfg = copy.deepcopy(run.cfg)
    cfg.train.mixed_precision = "bf16"
    assert fused_heads(cfg, run.task, run.unwrapped.student, run.teacher.model) is not None
    cfg.teacher.cache = str(tmp_path / "cache")
    assert fused_heads(cfg, run.task, run.unwrapped.student, run.teacher.model) is None
    cfg.train.mixed_precision = "no"
    assert fused_heads(cfg, run.task, run.unwrapped.student, run.teacher.model) is not None
    cls = make_run(
        make_cfg(
            tiny.save_model(tmp_path / "bert", "bert", task="sequence_classification"),
            _classification_jsonl(tmp_path / "c.jsonl"),
            tmp_path / "cls",
            losses=[{"type": "kl"}],
            task="sequence_classification",
        )
    )
    assert not cls.unwrapped.fused


# ---------------------------------------------------- the Minitron recipe: post-norm states, embeddings, ratio weights

MINITRON = [
    {"type": "kl"},
    {"type": "hidden", "metric": "cosine", "final_norm": True, "layers": "auto"},
    {"type": "embedding", "metric": "cosine"},
]
# A same-width student trained from scratch (seeded apart from the teacher, which seed 0 drew), and the
# teacher width-pruned to 16 (head_dim 8 kept): projectors.
MINITRON_STUDENTS = {
    "random": {"config": {"num_hidden_layers": 1}},
    "pruned": {
        "config": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32},
        "init": "prune",
    },
}


@pytest.mark.parametrize("student", list(MINITRON_STUDENTS))
def test_minitron_recipe_trains(teacher, corpus, tmp_path, student):
    """KL + post-norm cosine hidden term + cosine embedding term under ratio weights: finite, decreasing, balanced."""
    out = tmp_path / "out"
    alignkd.distill(
        make_cfg(
            teacher,
            corpus,
            out,
            losses=MINITRON,
            student=MINITRON_STUDENTS[student],
            weighting="ratio",
            steps=8,
            lr=3e-3,
            seed=1,
        )
    )
    rows = check_logged(out, ["kl", "hidden", "embedding"], steps=8)
    for r in rows:  # one micro-batch, one process: each feature term weighs exactly what the KL does
        for n in ("hidden", "embedding"):
            assert r[f"w/{n}"] * r[f"loss/{n}"] == pytest.approx(r["loss/kl"], rel=1e-4), (r["step"], n)
        assert r["w/kl"] == 1.0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss/kl"] < rows[0]["loss/kl"], [r["loss"] for r in rows]
    narrow = student == "pruned"
    assert (out / "projectors.safetensors").exists() == narrow
    if narrow:
        proj = load_file(str(out / "projectors.safetensors"))
        assert {k.split(".")[1] for k in proj} == {"hidden__0", "hidden__1", "embedding"}, sorted(proj)
        assert proj["projectors.embedding.linear.weight"].shape == (32, 16)


def test_final_norm_compares_each_models_own_post_norm_states(teacher, corpus, tmp_path):
    """At the last blocks, the post-norm hidden term is the metric between the two models' final states."""
    from alignkd.losses import hidden_cosine, hidden_mse

    # mse: the norms' gains start at 1, and cosine would not see a per-position scale.
    losses = [
        {"type": "hidden", "metric": "mse", "final_norm": True, "layers": [[0, 1]]},
        {"type": "embedding", "metric": "cosine"},
    ]
    run = make_run(
        make_cfg(teacher, corpus, tmp_path / "out", losses=losses, student=MINITRON_STUDENTS["random"], seed=1)
    )
    batch = next_batches(run, 0)[0]
    got = term_losses(
        run,
        batch,
        run.side(batch.input_ids, batch.mask),
        run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused),
        [None, None],
    )
    student = run.unwrapped.student
    with torch.no_grad():
        s_final = student.base_model(input_ids=batch.input_ids, attention_mask=batch.mask.long()).last_hidden_state
        t_final = run.teacher.model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.mask.long()
        ).last_hidden_state
        s_emb, t_emb = (
            student.get_input_embeddings()(batch.input_ids),
            run.teacher.model.get_input_embeddings()(batch.input_ids),
        )
    features = batch.mask  # the byte tokenizer adds no BOS: every real position counts
    assert got["hidden"].item() == pytest.approx(hidden_mse(s_final, t_final, features).item(), rel=1e-5)
    assert got["embedding"].item() == pytest.approx(hidden_cosine(s_emb, t_emb, batch.mask).item(), rel=1e-5)
    assert got["hidden"].item() > 0.01  # a random student: the check compares something


BF16_FUSED = [
    ("llama", {"type": "kl", "kind": "jsd", "temperature": 2.0}),
    ("gpt2", {"type": "kl"}),
    ("llama", {"type": "ce"}),
]


@pytest.mark.parametrize("family,output", BF16_FUSED, ids=[f"{f}-{o['type']}" for f, o in BF16_FUSED])
def test_fused_head_terms_equal_the_logit_terms_under_bf16_autocast(corpus, tmp_path, family, output):
    """As on full logits under bf16 autocast with a bf16 teacher (``auto`` on fast-bf16 hardware): the
    fused term makes the same bf16 logits as the models' heads, so the values agree to float32 rounding
    and the student's gradients to bf16's."""
    teacher = tiny.save_model(tmp_path / "teacher", family, layers=2, width=32)
    losses = [output, {"type": "hidden"}]
    grads, values = {}, {}
    for fused in (True, False):
        cfg = make_cfg(
            teacher, corpus, tmp_path / f"out{fused}", losses=losses, fused_head=fused, mixed_precision="bf16"
        )
        cfg["teacher"]["dtype"] = "bfloat16"
        run = make_run(cfg)
        assert run.unwrapped.fused is fused
        batch = next_batches(run, 0)[0]
        t_rec = run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what micro_step's accelerator.autocast() does
            s_rec = run.side(batch.input_ids, batch.mask)
            got = term_losses(run, batch, s_rec, t_rec, schedules_at(run, 0).temperatures)
        sum(got.values()).backward()
        values[fused] = {k: v.item() for k, v in got.items()}
        grads[fused] = {n: p.grad.clone() for n, p in run.unwrapped.student.named_parameters() if p.grad is not None}
    for k in values[False]:
        assert values[True][k] == pytest.approx(values[False][k], rel=1e-4), k
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(
            grads[True][n], grads[False][n], rtol=1e-2, atol=1e-2 * grads[False][n].abs().max().item() + 1e-9, msg=n
        )


def test_frozen_parameters_stay_bit_identical_and_out_of_the_optimizer(teacher, corpus, tmp_path, capsys):
    """student.freeze: the embedding and block 0's MLP copied from the teacher are not trained; the rest is."""
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}, {"type": "ce"}], steps=3)
    cfg["student"]["freeze"] = ["model.embed_tokens", "model.layers.0.mlp"]
    run = make_run(cfg)
    student = run.unwrapped.student
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    for name, p in student.named_parameters():
        frozen = name.startswith(("model.embed_tokens.", "model.layers.0.mlp."))
        assert p.requires_grad != frozen and (id(p) in in_optimizer) != frozen, name
    alignkd.distill(cfg)
    assert "M of them frozen" in " ".join(capsys.readouterr().err.split())
    after = student_weights(tmp_path / "run")
    before = load_file(str(teacher / "model.safetensors"))  # the student copied teacher block 1 as its block 0
    copied = {"model.embed_tokens.weight": "model.embed_tokens.weight"}
    copied.update(
        {
            f"model.layers.0.mlp.{m}.weight": f"model.layers.1.mlp.{m}.weight"
            for m in ("gate_proj", "up_proj", "down_proj")
        }
    )
    for mine, theirs in copied.items():
        assert torch.equal(after[mine], before[theirs]), mine
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.1.self_attn.q_proj.weight"]
    )


def test_freeze_patterns_that_match_nothing_or_starve_gradnorm_are_one_line_errors(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}])
    cfg["student"]["freeze"] = ["model.embed_token"]
    with pytest.raises(ConfigError, match="student.freeze: 'model.embed_token' matches no parameter of the student"):
        alignkd.distill(cfg)
    cfg["student"]["freeze"] = ["*embed_tokens*"]
    cfg["weighting"] = {"strategy": "gradnorm"}
    with pytest.raises(ConfigError, match="input embedding frozen, and GradNorm measures"):
        alignkd.distill(cfg)
