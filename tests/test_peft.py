"""PEFT students (``student.peft``): only the adapters train, the fused LM head keeps an adapter on ``lm_head``,
the export folds them in or writes the folder ``PeftModel.from_pretrained`` loads, and resume is exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import alignkd
from alignkd import testing as tiny
from alignkd.config import load_config
from alignkd.engine.loop import next_batches
from alignkd.engine.step import schedules_at, term_losses
from alignkd.errors import ConfigError
from alignkd.models.loading import load_model
from tests.test_engine import NARROW, make_cfg, make_run, read_metrics, resume_copy

# The teacher width-pruned to 16 (head_dim 8 kept): a hidden term then learns projectors.
PRUNED = {
    "config": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32},
    "init": "prune",
}
LORA = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def peft_student(base: dict | None = None, **peft) -> dict:
    return {**(base or {"from_teacher": {"layers": [0, 1]}}), "peft": {**LORA, **peft}}


def adapter_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_the_optimizer_holds_only_the_adapters_and_the_projectors(teacher, corpus, tmp_path):
    # A narrower pruned student: the hidden term learns a projector beside the adapters.
    student = peft_student(PRUNED, target_modules=["all-linear"])
    cfg = make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}, {"type": "hidden"}], student=student)
    run = make_run(cfg)
    side = run.unwrapped
    held = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    names = {n for n, p in side.named_parameters() if id(p) in held}
    adapters = {f"student.{n}" for n in adapter_names(side.student)}
    projectors = {n for n in names if n.startswith("projectors.")}
    assert adapters and projectors
    assert names == adapters | projectors
    # all-linear adapts every linear layer but the output head
    linear = {n for n, m in side.student.named_modules() if hasattr(m, "base_layer")}
    assert len(linear) == 2 * 7 and not any(n.endswith("lm_head") for n in linear)


def test_all_linear_beside_lm_head_adapts_both(teacher, corpus, tmp_path):
    student = peft_student(target_modules=["all-linear", "lm_head"])
    run = make_run(make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}], student=student))
    adapted = {n for n, m in run.unwrapped.student.named_modules() if hasattr(m, "base_layer")}
    assert len(adapted) == 2 * 7 + 1 and "lm_head" in adapted


def test_training_changes_the_adapters_and_never_the_base(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}, {"type": "ce"}], student=peft_student())
    run = make_run(cfg)
    before = {n: p.detach().clone() for n, p in run.unwrapped.student.named_parameters()}
    for step in range(2):
        from alignkd.engine.step import optimizer_step

        optimizer_step(run, step, next_batches(run, step))
    after = dict(run.unwrapped.student.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= adapter_names(run.unwrapped.student)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def _fused_and_plain(teacher, corpus, tmp_path, peft: dict):
    """The same first micro-batch's kl + ce and their gradients, with the fused LM head and with full logits."""
    out = {}
    for fused in (True, False):
        cfg = make_cfg(
            teacher,
            corpus,
            tmp_path / f"r{fused}",
            losses=[{"type": "kl"}, {"type": "ce"}],
            student=peft_student(**peft),
            fused_head=fused,
        )
        run = make_run(cfg)
        out[fused] = run
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA's B starts at zero: give the adapters an update to get right
            for n, p in sorted(run.unwrapped.student.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    values = {}
    for fused, run in out.items():
        batch = next_batches(run, 0)[0]
        rec_s = run.side(batch.input_ids, batch.mask)
        rec_t = run.teacher.record(batch, run.accelerator.device, run.unwrapped.fused)
        losses = term_losses(run, batch, rec_s, rec_t, schedules_at(run, 0).temperatures)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in run.unwrapped.student.named_parameters() if p.grad is not None}
        values[fused] = ({k: v.item() for k, v in losses.items()}, grads, run.unwrapped.fused)
    return values


@pytest.mark.parametrize("tied", [False, True])
def test_a_lora_head_runs_fused_and_agrees_with_the_full_logits(teacher, corpus, tmp_path, tied):
    if tied:  # the head is the input embedding (SmolLM2, Gemma): the adapter sits on the shared matrix
        teacher = tiny.save_model(tmp_path / "tied", tie_word_embeddings=True)
    peft = {"target_modules": ["q_proj", "lm_head"]}
    values = _fused_and_plain(teacher, corpus, tmp_path, peft)
    (fused_loss, fused_grad, was_fused), (plain_loss, plain_grad, _) = values[True], values[False]
    assert was_fused, "an adapter on lm_head without dropout runs in the fused head"
    for k in plain_loss:
        assert fused_loss[k] == pytest.approx(plain_loss[k], rel=1e-5, abs=1e-6)
    head = [n for n in plain_grad if n.startswith("lm_head.lora_")]
    assert len(head) == 2, "the head's adapter gets gradients"
    assert set(fused_grad) == set(plain_grad)
    for n in plain_grad:
        torch.testing.assert_close(fused_grad[n], plain_grad[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_head_adapter_that_stops_being_low_rank_is_never_dropped_silently(teacher, corpus, tmp_path):
    from alignkd.errors import FamilyError

    student = peft_student(target_modules=["lm_head"])
    run = make_run(make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}], student=student))
    assert run.unwrapped.fused and run.unwrapped.head.lora() is not None
    run.unwrapped.student.lm_head.lora_dropout["default"] = torch.nn.Dropout(0.1)  # changed after set-up
    with pytest.raises(FamilyError, match="set train.fused_head: false"):
        run.unwrapped.head.lora()


def test_a_lora_head_with_dropout_keeps_the_logits(teacher, corpus, tmp_path):
    cfg = make_cfg(
        teacher,
        corpus,
        tmp_path / "r",
        losses=[{"type": "kl"}],
        student=peft_student(target_modules=["lm_head"], dropout=0.1),
    )
    run = make_run(cfg)
    assert not run.unwrapped.fused  # dropout on the head's input is not base + delta: the adapted head makes logits


def test_merged_export_equals_the_adapter_folder(teacher, corpus, tmp_path):
    losses = [{"type": "kl"}, {"type": "ce"}]
    runs = {}
    for merge in (True, False):
        out = tmp_path / f"m{merge}"
        student = peft_student(merge=merge, target_modules=["q_proj", "v_proj", "lm_head"])
        alignkd.distill(make_cfg(teacher, corpus, out, losses=losses, student=student, steps=3))
        runs[merge] = out
    merged = AutoModelForCausalLM.from_pretrained(runs[True] / "student").eval()
    assert not any(".lora_" in n for n in merged.state_dict())
    folder = runs[False] / "student"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((folder / "base").resolve())
    base = AutoModelForCausalLM.from_pretrained(folder / "base")
    # The base is the student as built, untouched: the teacher's blocks.
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    for n, v in base.state_dict().items():
        torch.testing.assert_close(v, teacher_model.state_dict()[n], msg=n)
    adapted = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, teacher_model(ids).logits, atol=1e-4), "training changed the student"
    # alignkd's own loader reads the adapter folder as the merged model (alignkd eval, the card, the study),
    # also from a copy of the run folder, whose base is no longer where adapter_config.json says
    moved = tmp_path / "moved"
    shutil.copytree(runs[False], moved)
    shutil.rmtree(runs[False])
    loaded = load_model(str(moved / "student"), task="causal_lm").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, a, rtol=1e-5, atol=1e-5)
    card = (moved / "student" / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card and "PeftModel.from_pretrained" in card
    assert "library_name: transformers" in (runs[True] / "student" / "README.md").read_text()
    summary = json.loads((runs[True] / "summary.json").read_text())
    assert summary["student_params"] == sum(p.numel() for p in merged.parameters())


def test_resume_equals_the_uninterrupted_run(teacher, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    student = peft_student(dropout=0.1)  # dropout: the RNG must come back too
    cfg = make_cfg(teacher, corpus, a, losses=[{"type": "kl"}, {"type": "ce"}], student=student, steps=4, save_every=2)
    alignkd.distill(cfg)
    resume_copy(a, b, cfg, 4)
    rows_a, _ = read_metrics(a)
    rows_b, _ = read_metrics(b)
    assert [r["loss"] for r in rows_b[-2:]] == [r["loss"] for r in rows_a[-2:]]
    wa, wb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize(
    ("peft", "message"),
    [
        ({"method": "lorra"}, "student.peft.method: 'lorra' is not one of lora, dora, rslora; did you mean 'lora'?"),
        ({"r": 0}, "student.peft.r: must be >= 1"),
        ({"dropout": 1.0}, "student.peft.dropout: 1 is outside [0, 1)"),
        ({"target_modules": []}, "student.peft.target_modules: empty"),
    ],
)
def test_bad_peft_settings_are_one_line(teacher, corpus, tmp_path, peft, message):
    cfg = make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}], student=peft_student(**peft))
    with pytest.raises(ConfigError) as e:
        load_config(data=cfg)
    assert message in str(e.value)


def test_target_modules_that_match_nothing_name_the_layers_there_are(teacher, corpus, tmp_path):
    cfg = make_cfg(
        teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}], student=peft_student(target_modules=["qproj"])
    )
    with pytest.raises(ConfigError, match=r"'qproj' matches no linear layer of the student; .*named .*q_proj"):
        alignkd.distill(cfg)
    assert not (tmp_path / "r").exists()


def test_a_random_student_gets_no_adapters(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}], student=peft_student(NARROW))
    with pytest.raises(ConfigError, match="student.peft: adapters learn a small change"):
        load_config(data=cfg)


def test_sharded_launches_refuse_adapters_in_one_line(teacher, corpus, tmp_path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from alignkd.backend.strategy import FSDP2, ZeRO
    from alignkd.engine.setup import setup

    assert not FSDP2.adapters and not ZeRO.adapters
    cfg = load_config(data=make_cfg(teacher, corpus, tmp_path / "r", losses=[{"type": "kl"}], student=peft_student()))
    with pytest.raises(ConfigError, match="student.peft: adapters train under one process or DDP"):
        setup(cfg, Accelerator(mixed_precision="no"), say=lambda _: None, backend=SimpleNamespace(adapters=False))


def test_a_tied_head_with_an_adapter_exports_what_it_trained(tmp_path, corpus):
    """SmolLM2 and Gemma tie the head to the embedding: the head's update must reach the exported head and leave
    the embedding as it was, in the merged folder and when alignkd reads the adapter folder."""
    teacher = tiny.save_model(tmp_path / "tied", tie_word_embeddings=True)
    runs = {}
    for merge in (True, False):
        student = peft_student(merge=merge, target_modules=["q_proj", "lm_head"])
        # ce: the student starts as the teacher's copy, where kl alone has no gradient
        losses = [{"type": "kl"}, {"type": "ce"}]
        cfg = make_cfg(teacher, corpus, tmp_path / f"m{merge}", losses=losses, student=student, lr=1e-2)
        alignkd.distill(cfg)
        runs[merge] = tmp_path / f"m{merge}" / "student"
    # The truth: the base with the adapter applied at run time (peft, unmerged).
    base = AutoModelForCausalLM.from_pretrained(runs[False] / "base")
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    live = PeftModel.from_pretrained(base, runs[False]).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = live(ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(runs[False] / "base").eval()  # peft adapted `base` in place
        assert not torch.allclose(want, untouched(ids).logits, atol=1e-3), "the adapters trained"
        merged = AutoModelForCausalLM.from_pretrained(runs[True]).eval()
        assert not merged.config.tie_word_embeddings
        summary = json.loads((runs[True].parent / "summary.json").read_text())
        assert summary["student_params"] == sum(p.numel() for p in merged.parameters())
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
        loaded = load_model(str(runs[False]), task="causal_lm").eval()
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
