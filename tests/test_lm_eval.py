"""``alignkd eval --tasks``: lm-eval-harness tasks on the loaded student, teacher and baselines.

One CLI run on tiny models and a tiny local task (a CSV and a YAML written here, three
choices per document) checks what eval.json records and the retention arithmetic;
the rest (retention, names, rows) are plain functions, checked without lm-eval.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from alignkd import cli
from alignkd import testing as tiny
from alignkd.errors import EvalError
from alignkd.evaluate.harness import check_names
from alignkd.evaluate.task_files import PACKAGED_TASKS, write_task_files
from alignkd.evaluate.task_results import kept, task_rows

CHOICES = ["red", "green", "blue"]
LIMIT = 8
SHOTS = 2


def write_task(folder: Path) -> str:
    """A three-way multiple-choice task over a CSV in ``folder``; returns its name."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "colours.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(24):
            w.writerow([f"the {i}th thing is {CHOICES[i % 3]}", CHOICES[i % 3]])
    task = {
        "task": "tiny_colours",
        "dataset_path": "csv",
        "dataset_kwargs": {"data_files": {"train": str(folder / "colours.csv"), "test": str(folder / "colours.csv")}},
        "test_split": "test",
        "fewshot_split": "train",
        "output_type": "multiple_choice",
        "doc_to_text": "{{text}}. Colour:",
        "doc_to_choice": CHOICES,
        "doc_to_target": "{{" + repr(CHOICES) + ".index(label)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 2.0},
    }
    (folder / "tiny_colours.yaml").write_text(yaml.safe_dump(task))
    return task["task"]


@pytest.mark.slow
def test_eval_runs_a_local_task_on_student_teacher_and_baseline(teacher, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    name = write_task(tmp_path / "tasks")
    student = tiny.save_model(tmp_path / "student", "llama", layers=1, width=32, seed=1)
    out = tmp_path / "out"
    argv = ["eval", str(student), "--teacher", str(teacher), "--baseline", f"ce={student}", "--out", str(out)]
    argv += ["--skip", "perplexity", "accuracy", "generation", "latency"]
    argv += ["--tasks", name, "--task-path", str(tmp_path / "tasks"), "--num-fewshot", str(SHOTS)]
    assert cli.main([*argv, "--limit", str(LIMIT)]) == 0
    result = json.loads((out / "eval.json").read_text())

    task = result["tasks"][name]
    assert task["shots"] == SHOTS  # what lm-eval used, as the flag asked
    assert task["limit"] == LIMIT and task["docs"] == LIMIT
    assert task["version"] == 2.0 and task["metric"] == "acc"
    assert task["chance"] == pytest.approx(1 / len(CHOICES))
    assert task["template"]["doc_to_text"] == "{{text}}. Colour:" and task["template"]["doc_to_choice"] == CHOICES
    assert len(task["config_sha256"]) == 64
    assert result["settings"]["num_fewshot"] == SHOTS and result["settings"]["tasks"] == [name]
    for role in ("teacher", "student", "ce"):
        score = result["models"][role]["tasks"][name]
        assert score["shots"] == SHOTS
        assert 0 <= score["value"] <= 1 and score["value"] * LIMIT == pytest.approx(round(score["value"] * LIMIT))
        assert score["stderr"] > 0 or score["value"] in (0, 1)
    # The baseline is the student under another name: the same numbers, so lm-eval scored the model it was given.
    assert result["models"]["ce"]["tasks"] == result["models"]["student"]["tasks"]

    t = result["models"]["teacher"]["tasks"][name]["value"]
    s = result["models"]["student"]["tasks"][name]["value"]
    ret = result["task_retention"]["student"][name]
    assert set(result["task_retention"]) == {"student", "ce"}
    assert ret["kept"] == (pytest.approx(s / t) if t > 0 else None)
    c = task["chance"]
    assert ret["kept_above_chance"] == (pytest.approx((s - c) / (t - c)) if t > c else None)
    printed = capsys.readouterr().out
    assert f"{name} acc ({SHOTS}-shot)" in printed and "student kept" in printed


def test_kept_is_the_share_of_the_teacher_and_of_its_margin_over_chance():
    assert kept(0.6, 0.8, 0.5, True) == {"kept": pytest.approx(0.75), "kept_above_chance": pytest.approx(1 / 3)}
    assert kept(20.0, 10.0, None, False) == {"kept": pytest.approx(0.5), "kept_above_chance": None}
    # A teacher at or below chance leaves no margin to keep; a zero teacher no share.
    assert kept(0.6, 0.5, 0.5, True)["kept_above_chance"] is None
    assert kept(0.3, 0.0, None, True)["kept"] is None
    assert math.isclose(kept(0.25, 0.5, 0.25, True)["kept_above_chance"], 0.0)


def test_task_rows_state_the_shots_and_the_margin_over_chance():
    result = {
        "tasks": {"t": {"metric": "acc", "shots": 4, "chance": 0.5, "higher_is_better": True}},
        "models": {
            "teacher": {"tasks": {"t": {"value": 0.8, "stderr": 0.04}}},
            "student": {"tasks": {"t": {"value": 0.65, "stderr": 0.05}}},
        },
        "task_retention": {"student": {"t": kept(0.65, 0.8, 0.5, True)}},
    }
    (label, values, shares), (label2, margins, shares2) = task_rows(result)
    assert label == "t acc (4-shot)" and values == {"teacher": "80.0% ± 4.0", "student": "65.0% ± 5.0"}
    assert shares == {"student": "81.2%"} and label2 == "t above chance (50.0%)"
    assert margins == {"teacher": "+30.0 pts", "student": "+15.0 pts"} and shares2 == {"student": "50.0%"}


def test_the_report_shows_task_scores_retention_and_what_fixes_them():
    from alignkd.report.render import to_markdown
    from alignkd.report.tasks import task_blocks

    result = {
        "tasks": {
            "t": {
                "metric": "acc",
                "shots": 4,
                "version": 1.0,
                "limit": 200,
                "docs": 200,
                "chance": 0.5,
                "template": {"doc_to_text": "Review: {{text}}"},
                "config_sha256": "ab" * 32,
            }
        },
        "models": {"student": {"tasks": {"t": {"value": 0.65}}}, "teacher": {"tasks": {"t": {"value": 0.8}}}},
        "task_retention": {"student": {"t": kept(0.65, 0.8, 0.5, True)}},
    }
    md = to_markdown(task_blocks(result), {})
    assert "| t acc (4-shot) | 80.0% | 65.0% |" in md  # the teacher's column first
    assert "| t above chance (50.0%) | 50.0% |" in md
    assert "t: 4-shot, version 1.0, 200 documents (limit 200), metric acc, chance 50.0%" in md
    assert "abababababab" in md and "Review: {{text}}" in md
    assert task_blocks({"models": result["models"]}) == []


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    import sys

    from alignkd.evaluate.harness import lm_eval_module

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval then raises ImportError
    with pytest.raises(EvalError, match=r"not installed; pip install 'alignkd\[eval\]'"):
        lm_eval_module()


def test_an_unknown_task_name_lists_the_close_ones():
    with pytest.raises(EvalError, match=r"unknown lm-eval task 'hellaswg'; close names: hellaswag") as e:
        check_names(["hellaswg"], ["hellaswag", "arc_easy", "alignkd_sentiment"], ["alignkd_sentiment"])
    assert "--task-path" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EvalError, match=r"not prepared; run `alignkd assets --only sentiment`"):
        check_names(["alignkd_sentiment"], ["hellaswag"], [])


def test_packaged_task_files_point_at_the_data_and_skip_what_is_missing(tmp_path):
    data = tmp_path / "sentiment"
    data.mkdir()
    assert write_task_files(tmp_path / "tasks", {"sentiment": data}) == []  # no CSVs yet
    for split in ("train", "test"):
        (data / f"{split}.csv").write_text("text,label\ngood,positive\n")
    assert write_task_files(tmp_path / "tasks", {"sentiment": data}) == list(PACKAGED_TASKS)
    task = yaml.safe_load((tmp_path / "tasks" / "alignkd_sentiment.yaml").read_text())
    assert task["dataset_kwargs"]["data_files"]["test"] == str((data / "test.csv").resolve())
    assert task["doc_to_choice"] == ["negative", "positive"]


@pytest.mark.slow
def test_a_quick_study_scores_its_tasks_beside_each_variants_teacher(tmp_path, monkeypatch):
    """A study's ``eval:`` entry: the packaged task on the stand-in sentiment data and a task of the user's."""
    pytest.importorskip("lm_eval")
    from alignkd.study import load_study, run_study

    monkeypatch.setenv("ALIGNKD_CACHE", str(tmp_path / "no-assets"))  # the stand-ins must feed alignkd_sentiment
    name = write_task(tmp_path / "tasks")
    study = {
        "base": {
            "teacher": {"path": "${assets.teacher}"},
            "student": {"from_teacher": {"num_layers": 1}},
            "data": {"train": "${assets.sotu}", "eval": "${assets.moby_dick}"},
            "losses": [{"type": "kl"}],
        },
        "variants": [{"name": "kl"}],
        "quick": {"steps": 1, "teacher": {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 2}},
        "eval": {"tasks": ["alignkd_sentiment", name], "num_fewshot": 1, "task_paths": [str(tmp_path / "tasks")]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    result = run_study(load_study(path), out, quick=True)
    ev = json.loads((out / "kl" / "tasks" / "eval.json").read_text())
    assert list(ev["models"]) == ["teacher", "student"] and set(ev["tasks"]) == {"alignkd_sentiment", name}
    assert all(t["shots"] == 1 and t["limit"] == 8 for t in ev["tasks"].values())
    row = result["variants"][0]["tasks"]
    assert set(row) >= {"alignkd_sentiment acc (1-shot)", f"{name} acc (1-shot)"}
    md = (out / "study.md").read_text()
    assert f"{name} acc (1-shot)" in md and "| teacher |" in md


def test_task_flags_default_to_the_settings_defaults():
    from alignkd.evaluate import EvalSettings

    args = cli.build_parser().parse_args(["eval", "m", "--tasks", "a, b", "--task-path", "x", "--task-path", "y"])
    assert args.tasks == ["a", "b"] and args.task_path == ["x", "y"]
    defaults = cli.build_parser().parse_args(["eval", "m"])
    s = EvalSettings()
    assert (defaults.num_fewshot, defaults.limit, tuple(defaults.tasks)) == (s.num_fewshot, s.limit, s.tasks)


@pytest.mark.slow
def test_data_lm_eval_cannot_load_stops_before_any_model(tmp_path):
    pytest.importorskip("lm_eval")
    from alignkd.evaluate.harness import open_harness

    name = write_task(tmp_path / "tasks")
    (tmp_path / "tasks" / "colours.csv").unlink()
    harness = open_harness([name], paths=[str(tmp_path / "tasks")], assets={})
    with pytest.raises(EvalError, match=f"could not load the data of {name}"):
        harness.__enter__()
