"""Tests of choosing a depth-pruned student's blocks.

The code is in alignkd.align.blocks and alignkd.engine.block_choice; the command is ``alignkd choose-blocks``.

The state scores are checked against a plain reference computed here from the
model's own hidden states; the loss-based scores against a plain cross-entropy
of the pruned model. A teacher trained with one block held at the identity
(zeroed output projections) is the case every rule must get right: removing
that block changes nothing, so it is the one to drop. Runs check that the
chosen blocks land in config.yaml and block_scores.json, and that rerunning
that config.yaml gives the same student, probes and all.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import alignkd
from alignkd import testing as tiny
from alignkd.align.blocks import RULES, Calibration, calibration_loss, choose, removal_increase, state_scores
from alignkd.align.tasks import TASKS
from alignkd.cli import main
from alignkd.config import ConfigError, FromTeacherConfig, load_config
from alignkd.engine.block_choice import choose_blocks_only
from alignkd.models.families import FAMILIES, blocks_of, get_path
from alignkd.models.student import depth_pruned

REPO = Path(__file__).resolve().parents[1]
IDENTITY = 1  # the block of the trained teacher that adds nothing


def text_rows(seq: int = 32) -> torch.Tensor:
    ids = torch.tensor(tiny.byte_tokenizer()(tiny.TEXT * 4, add_special_tokens=False)["input_ids"])
    return ids[: len(ids) // seq * seq].view(-1, seq)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-block, 32-wide llama trained on the corpus text, block 1 held at the identity; saved with its tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("llama", layers=4, width=32))
    held = blocks_of(model)[IDENTITY]
    for proj in (held.self_attn.o_proj, held.mlp.down_proj):
        nn.init.zeros_(proj.weight)
        proj.weight.requires_grad_(False)  # the block's attention and MLP add exactly 0 to the residual
    rows = text_rows()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        batch = rows[torch.randint(len(rows), (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = tmp_path_factory.mktemp("trained") / "llama"
    model.save_pretrained(path)
    tiny.byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny.write_corpus(tmp_path_factory.mktemp("corpus"))


def calibration(ids: torch.Tensor, *, task: str = "causal_lm", skip_bos: bool = False, **extra) -> Calibration:
    return Calibration({"input_ids": ids, **extra}, TASKS[task], tiny.byte_tokenizer(), skip_bos=skip_bos, batch_size=4)


# ---------------------------------------------------------------- state scores against a plain reference


def reference_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Input of every block and output of the last, ``[B, T, D]`` float64.

    From ``output_hidden_states``, with the final norm removed.
    """
    bare = copy.deepcopy(model)
    parent, _, name = FAMILIES[bare.config.model_type].final_norm.rpartition(".")
    setattr(get_path(bare.base_model, parent) if parent else bare.base_model, name, nn.Identity())
    with torch.no_grad():
        hs = bare.base_model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    assert len(hs) == len(blocks_of(model)) + 1
    return [h.double() for h in hs]


def plain_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


CASES = {
    "llama": {"family": "llama"},
    "llama-skip-bos": {"family": "llama", "skip_bos": True},
    "gpt2": {"family": "gpt2"},
    "llama-classifier-padded": {"family": "llama", "task": "sequence_classification"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_block_influence_and_span_distances_match_a_plain_reference(case):
    kw = CASES[case]
    task = kw.get("task", "causal_lm")
    model = tiny.build(kw["family"], layers=4, width=32, task=task, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 261, (6, 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    extra = {}
    if task == "sequence_classification":
        lengths = torch.tensor([12, 7, 12, 3, 9, 12])
        mask = torch.arange(12)[None] < lengths[:, None]  # right padding: pad states must not count
        extra = {"mask": mask.long(), "labels": torch.tensor([0, 1, 1, 0, 1, 0])}
    counted = mask.clone()
    if kw.get("skip_bos"):
        counted[:, 0] = False
    span = 2
    influence, angular = state_scores(
        model, calibration(ids, task=task, skip_bos=kw.get("skip_bos", False), **extra), span
    )

    h = reference_states(model, ids, mask)
    ref_bi = [(1 - plain_cos(h[i], h[i + 1]))[counted].mean().item() for i in range(4)]
    ref_ang = [
        (torch.arccos(plain_cos(h[i], h[i + span]).clamp(-1, 1)) / math.pi)[counted].mean().item()
        for i in range(4 - span + 1)
    ]
    torch.testing.assert_close(torch.tensor(influence), torch.tensor(ref_bi), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(angular), torch.tensor(ref_ang), rtol=1e-4, atol=1e-6)
    assert min(influence) > 0  # random blocks do change their input


def test_state_scores_leave_the_teacher_without_hooks():
    model = tiny.build("llama", layers=3)
    ids = torch.randint(5, 261, (2, 8))
    state_scores(model, calibration(ids), 1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_span_of_nothing_has_no_distances():
    model = tiny.build("llama", layers=3)
    influence, angular = state_scores(model, calibration(torch.randint(5, 261, (2, 8))), 0)
    assert len(influence) == 3 and angular == []


# ---------------------------------------------------------------- loss-based scores


def test_calibration_loss_of_a_removal_is_the_pruned_models_cross_entropy(trained):
    teacher = AutoModelForCausalLM.from_pretrained(trained).eval()
    ids = text_rows()[:6]
    calib = calibration(ids)
    base = calibration_loss(teacher, calib)
    with torch.no_grad():
        assert base == pytest.approx(teacher(input_ids=ids, labels=ids).loss.item(), rel=1e-5)
        pruned = depth_pruned(teacher, [0, 1, 3], None).eval()  # a real copy, not the shared view
        want = pruned(input_ids=ids, labels=ids).loss.item() - base
    assert removal_increase(teacher, calib, [2], base) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_every_rule_drops_the_identity_block(trained):
    teacher = AutoModelForCausalLM.from_pretrained(trained).eval()
    calib = calibration(text_rows()[:8])
    keep = [i for i in range(4) if i != IDENTITY]
    for select, contiguous in (
        ("perplexity", False),
        ("importance", False),
        ("perplexity", True),
        ("importance", True),
    ):
        ft = FromTeacherConfig(num_layers=3, select=select, contiguous=contiguous)
        sel = choose(teacher, calib, ft)
        assert sel.layers == keep, f"{select} contiguous={contiguous}: kept {sel.layers}"
    drops = choose(teacher, calib, FromTeacherConfig(num_layers=3, select="perplexity")).scores[
        "block_removal_loss_increase"
    ]
    assert abs(drops[IDENTITY]) < 1e-6  # removing it computes exactly the same
    assert all(d > 0.01 for i, d in enumerate(drops) if i != IDENTITY), drops  # every trained block matters
    influence = choose(teacher, calib, FromTeacherConfig(num_layers=3)).scores["block_influence"]
    assert abs(influence[IDENTITY]) < 1e-6 and all(b > 1e-3 for i, b in enumerate(influence) if i != IDENTITY)


def test_scoring_a_removal_leaves_the_teacher_unchanged(trained):
    teacher = AutoModelForCausalLM.from_pretrained(trained).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    choose(teacher, calibration(text_rows()[:4]), FromTeacherConfig(num_layers=2, select="perplexity", contiguous=True))
    assert len(blocks_of(teacher)) == 4 and teacher.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in blocks_of(teacher)] == [0, 1, 2, 3]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- runs


def run_config(teacher: Path, corpus: Path, out: Path, **from_teacher) -> dict:
    return {
        "teacher": {"path": str(teacher), "dtype": "float32"},
        "student": {"from_teacher": {"num_layers": 2, **from_teacher}},
        "data": {"train": str(corpus), "seq_len": 16, "eval_fraction": 0.1},
        "losses": [{"type": "kl"}, {"type": "hidden"}],
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
        },
    }


@pytest.mark.parametrize("select", ["importance", "search"])
def test_a_run_records_its_chosen_blocks_and_its_config_reruns_exactly(tmp_path, corpus, select):
    # gpt2 has dropout: the student's steps draw random numbers, so the run after
    # the search's probes is only equal to the rerun if the probes left no trace.
    teacher = tiny.save_model(tmp_path / "gpt2", "gpt2", layers=4, width=32)
    a, b = tmp_path / "a", tmp_path / "b"
    extra = {"search_candidates": 2, "search_probe_steps": 1} if select == "search" else {}
    summary = alignkd.distill(run_config(teacher, corpus, a, select=select, calibration_sequences=16, **extra))
    saved = yaml.safe_load((a / "config.yaml").read_text())
    scores = json.loads((a / "block_scores.json").read_text())
    layers = saved["student"]["from_teacher"]["layers"]
    assert layers == scores["layers"] and len(layers) == 2 and scores["select"] == select
    assert len(scores["block_influence"]) == 4 and scores["calibration_sequences"] == 16
    if select == "importance":
        bi = scores["block_influence"]
        assert layers == sorted(sorted(range(4), key=lambda i: -bi[i])[:2])
    else:
        probes = scores["candidates"]
        assert [c["rule"] for c in probes] == [r for r in RULES if r in {c["rule"] for c in probes}][:2] and len(
            probes
        ) == 2
        assert layers == min(probes, key=lambda c: c["probe_loss"])["layers"]
    assert json.loads((a / "summary.json").read_text())["student_params"] == summary["student_params"]

    saved["train"]["output_dir"] = str(b)
    again = alignkd.distill(saved)  # layers given: nothing is chosen, nothing measured
    assert not (b / "block_scores.json").exists()
    assert (
        again["student_eval"] == summary["student_eval"]
        and again["last_train"]["loss"] == summary["last_train"]["loss"]
    )
    wa, wb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_search_is_deterministic_and_keeps_the_best_probe(tmp_path, corpus, trained):
    cfg = run_config(
        trained,
        corpus,
        tmp_path / "p",
        num_layers=2,
        select="search",
        search_candidates=2,
        search_probe_steps=1,
        calibration_sequences=8,
    )
    first, _ = choose_blocks_only(load_config(data=copy.deepcopy(cfg)), say=lambda m: None)
    second, path = choose_blocks_only(load_config(data=copy.deepcopy(cfg)), say=lambda m: None)
    assert first.scores == second.scores and first.layers == second.layers
    tried = first.scores["candidates"]
    assert len(tried) == 2 and all(math.isfinite(c["probe_loss"]) for c in tried)
    assert first.layers == min(tried, key=lambda c: c["probe_loss"])["layers"]
    assert json.loads(path.read_text())["layers"] == first.layers


@pytest.mark.slow
def test_prune_cli_prints_and_saves_the_block_scores(tmp_path, corpus, trained):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(trained, corpus, tmp_path / "out", select="importance", layers=[0, 1])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The layers already listed are chosen anew: prune runs the selection whatever the config holds.
    p = subprocess.run(
        [sys.executable, "-m", "alignkd.cli", "choose-blocks", str(cfg), "student.from_teacher.num_layers=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    keep = [i for i in range(4) if i != IDENTITY]
    assert f"chosen by importance: {keep}" in p.stdout
    scores = json.loads((tmp_path / "out" / "block_scores.json").read_text())
    assert scores["layers"] == keep and scores["teacher_blocks"] == 4 and len(scores["block_influence"]) == 4
    table = [line.split() for line in p.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in table] == [0, 1, 2, 3]
    assert [float(r[1]) for r in table] == pytest.approx(scores["block_influence"], rel=1e-4, abs=1e-9)
    assert [len(r) == 3 for r in table] == [i in keep for i in range(4)]  # the kept mark


# ---------------------------------------------------------------- bad input


def base_cfg(**student) -> dict:
    return {"teacher": {"path": "t"}, "data": {"train": "d"}, "losses": [{"type": "kl"}], "student": student}


@pytest.mark.parametrize(
    ("student", "message"),
    [
        (
            {"path": "s", "from_teacher": {"select": "importance"}},
            "student.from_teacher.select: choosing blocks applies to a student copied from the teacher, "
            "and this one comes from student.path",
        ),
        ({"config": {"num_hidden_layers": 1}, "from_teacher": {"select": "search"}}, "comes from student.config"),
        ({"from_teacher": {"select": "importnce"}}, "did you mean 'importance'"),
        (
            {"from_teacher": {"select": "even", "contiguous": True}},
            "student.from_teacher.contiguous: applies to select importance or perplexity, not even",
        ),
        ({"from_teacher": {"select": "search", "contiguous": True}}, "not search"),
        ({"from_teacher": {"calibration_sequences": 0}}, "student.from_teacher.calibration_sequences: must be >= 1"),
        ({"from_teacher": {"search_candidates": 0}}, "student.from_teacher.search_candidates: must be between 1 and 5"),
        ({"from_teacher": {"search_candidates": 6}}, "must be between 1 and 5"),
        ({"from_teacher": {"search_probe_steps": 0}}, "student.from_teacher.search_probe_steps: must be >= 1"),
    ],
)
def test_bad_selection_settings_are_one_line(student, message):
    with pytest.raises(ConfigError) as info:
        load_config(data=base_cfg(**student))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_old_command_name_prune_says_what_it_became(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(config={"num_hidden_layers": 1})))
    assert main(["prune", str(cfg)]) == 2  # runs choose-blocks, which refuses this student in one line
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "alignkd prune is now `alignkd choose-blocks`; running that"
    assert len(lines) == 2 and lines[1].startswith("alignkd choose-blocks: error: student.from_teacher")


def test_prune_needs_a_student_from_the_teacher(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(config={"num_hidden_layers": 1})))
    assert main(["choose-blocks", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "student.from_teacher" in err and "num_layers" in err


def test_prune_refuses_a_count_the_teacher_cannot_give(tmp_path, corpus, trained, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_config(trained, corpus, tmp_path / "o", select="importance", num_layers=9)))
    assert main(["choose-blocks", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "num_layers: must be between 1 and 4" in err
