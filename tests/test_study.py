"""``alignkd study``: the study file's rules, how overrides merge, a quick study of configs/studies/lm.yaml end to end.

The quick study runs on stand-ins with an empty asset cache, as on a machine
without the packaged assets: the whole CLI, every variant of the shipped study,
then ``--only`` reruns that keep (or drop, once the file changes) the other
variants' finished runs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from alignkd.cli import main
from alignkd.config import load_config
from alignkd.errors import AssetError, ConfigError
from alignkd.study import load_study, run_study
from alignkd.study.merge import merge, substitute
from alignkd.study.resolve import ASSET_NAMES, Names
from alignkd.study.runner import command
from alignkd.study.spec import PREPARE_COMMANDS, STEP_CAP, budgeted
from alignkd.study.standin import shrink, tiny_shape

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
LM = ROOT / "configs" / "studies" / "lm.yaml"

BASE = {
    "teacher": {"path": "t"},
    "student": {"from_teacher": {"num_layers": 2}},
    "data": {"train": "d"},
    "losses": [{"type": "kl"}],
}


def write_study(tmp_path: Path, **fields) -> Path:
    data = {"base": BASE, "variants": [{"name": "a"}, {"name": "b", "set": {"losses": [{"type": "ce"}]}}], **fields}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- merge rules


def test_overrides_merge_deep_dotted_keys_index_lists_and_lists_replace():
    base = {"a": {"b": 1, "c": {"d": 2}}, "losses": [{"type": "kl", "temperature": 1.0}, {"type": "ce"}]}
    got = merge(base, {"a": {"c": {"e": 3}}, "a.b": 5, "losses.0.temperature": 2.0, "new.deep": "x"})
    assert got == {
        "a": {"b": 5, "c": {"d": 2, "e": 3}},
        "losses": [{"type": "kl", "temperature": 2.0}, {"type": "ce"}],
        "new": {"deep": "x"},
    }
    assert merge(base, {"losses": [{"type": "dkd"}]})["losses"] == [
        {"type": "dkd"}
    ]  # a list replaces, whatever it held
    assert merge(base, {"a": None})["a"] is None  # null replaces too (e.g. student.from_teacher: null)
    assert merge(base, {"losses.1": {"weight": 0.5}})["losses"][1] == {
        "type": "ce",
        "weight": 0.5,
    }  # a mapping into a list item merges
    assert base["a"] == {"b": 1, "c": {"d": 2}} and base["losses"][0]["temperature"] == 1.0  # the base is never changed


@pytest.mark.parametrize(
    "overrides, fragment",
    [({"losses.5.weight": 1}, "'5' is not an index of a list of 2 items"), ({"a.b.c": 1}, "sits under a value")],
)
def test_overrides_that_cannot_apply_say_where(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        merge({"a": {"b": 1}, "losses": [{}, {}]}, overrides)


def test_names_are_substituted_inside_strings_and_unknown_names_list_the_known_ones(tmp_path):
    names = Names(tmp_path, {"sentiment": Path("/cache/sentiment")}, check_prepared=False, prepare=["ft"])
    got = substitute({"train": "${assets.sentiment}/train.csv", "t": ["${prepare.ft}"], "n": 3}, names)
    assert got == {"train": "/cache/sentiment/train.csv", "t": [str(tmp_path / "prepare" / "ft" / "student")], "n": 3}
    with pytest.raises(ConfigError) as info:
        substitute("${assets.sentimnt}", names)
    msg = str(info.value)
    assert "\n" not in msg and "${assets.sentiment}" in msg and "did you mean 'assets.sentiment'" in msg


def test_budget_sets_minutes_with_a_step_cap_or_exact_steps(tmp_path):
    study = load_study(write_study(tmp_path))
    cfg = budgeted(study.config("a"), study.spec.budget, tmp_path / "a")
    assert cfg["train"] == {
        "output_dir": str(tmp_path / "a"),
        "max_minutes": 5.0,
        "steps": STEP_CAP,
    }  # equal minutes by default
    study = load_study(write_study(tmp_path, budget={"steps": 40}))
    assert budgeted(study.config("b"), study.spec.budget, tmp_path / "b")["train"]["steps"] == 40


def test_extends_applies_the_earlier_variant_first(tmp_path):
    variants = [
        {"name": "a", "set": {"student.from_teacher.select": "importance", "losses": [{"type": "kl"}, {"type": "ce"}]}},
        {"name": "b", "extends": "a", "set": {"losses": [{"type": "dkd"}]}},
    ]
    study = load_study(write_study(tmp_path, variants=variants))
    cfg = study.config("b")
    assert cfg["student"]["from_teacher"] == {"num_layers": 2, "select": "importance"} and cfg["losses"] == [
        {"type": "dkd"}
    ]


# ----------------------------------------------------------------------------- study file errors


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (
            {"variants": [{"name": "a", "sett": {}}]},
            "variants[0].sett: unknown key; valid keys here: name, about, extends, set; did you mean 'set'?",
        ),
        ({"variants": []}, "variants: add at least one"),
        ({"budget": {"minutes": 0}}, "budget.minutes: 0 must be > 0"),
        ({"budget": {"minutes": 5, "steps": 10}}, "budget: give minutes or steps, not both"),
        ({"budget": {"hours": 1}}, "budget.hours: unknown key; valid keys here: minutes, steps"),
        ({"budget": {"steps": "many"}}, "budget.steps: expected an integer"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants[1].name: 'a' is used twice"),
        ({"variants": [{"name": "a b"}]}, "must be a folder name"),
        ({"variants": [{"name": "a", "extends": "z"}]}, "variants[0] (a).extends: 'z' is not an earlier variant"),
        ({"variants": [{"name": "a", "set": {"train": {"steps": 9}}}]}, "train.steps is set by the study"),
        ({"variants": [{"name": "a", "set": {"train.output_dir": "x"}}]}, "train.output_dir is set by the study"),
        (
            {"variants": [{"name": "a", "set": {"teacher.path": "${prepare.ft}"}}]},
            "${prepare.ft} names no prepare step",
        ),
        ({"reference": "c"}, "reference: 'c' is not a variant"),
        (
            {"prepare": [{"name": "ft", "command": "finetun"}]},
            "prepare[0].command: 'finetun' is not one of finetune; did you mean 'finetune'?",
        ),
        ({"quick": {"steps": 0}}, "quick.steps: 0 must be >= 1"),
    ],
)
def test_a_bad_study_file_is_one_line_naming_the_fix(tmp_path, fields, fragment):
    with pytest.raises(ConfigError) as info:
        load_study(write_study(tmp_path, **fields))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("s.yaml: ") and fragment in msg, msg


def test_the_cli_turns_a_bad_study_into_one_line_and_exit_2(tmp_path, capsys):
    assert main(["study", str(write_study(tmp_path, variants=[])), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("alignkd study: error: s.yaml: variants: add at least one")


def test_an_unprepared_asset_stops_the_study_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKD_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AssetError) as info:
        run_study(load_study(LM), tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and "alignkd assets --only teacher" in msg
    assert not (tmp_path / "out").exists()


def test_only_names_a_variant_of_the_study(tmp_path):
    with pytest.raises(ConfigError, match=r"--only kl-evn: no such variant; .* did you mean 'kl-even'\?"):
        run_study(load_study(LM), tmp_path / "out", quick=True, only=["kl-evn"])


# ----------------------------------------------------------------------------- shipped studies


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_variant_of_a_shipped_study_is_a_valid_config(path, tmp_path):
    study = load_study(path)
    names = Names(
        tmp_path,
        {a: tmp_path / a for a in ASSET_NAMES},
        check_prepared=False,
        prepare=[p.name for p in study.spec.prepare],
    )
    for name in study.names:
        cfg = load_config(data=substitute(budgeted(study.config(name), study.spec.budget, tmp_path / name), names))
        assert cfg.train.output_dir == str(tmp_path / name) and cfg.train.max_minutes == study.spec.budget.minutes
    for step in study.spec.prepare:
        load_config(data=substitute(study.step_config(step.name), names))


def test_lm_study_has_the_planned_rows():
    study = load_study(LM)
    cfg = {n: study.config(n) for n in study.names}
    assert cfg["ce"]["losses"] == [{"type": "ce"}]
    assert cfg["kl-search"]["student"]["from_teacher"] == {"num_layers": 6, "select": "search"}
    assert [t["type"] for t in cfg["minitron"]["losses"]] == ["kl", "hidden", "embedding"] and cfg["minitron"][
        "weighting"
    ]["strategy"] == "ratio"
    assert (
        cfg["minitron-corrected"]["teacher"]["path"] == "${prepare.corrected}"
        and cfg["minitron-corrected"]["losses"] == cfg["minitron"]["losses"]
    )
    assert (
        cfg["narrow-feature"]["student"]["config"]["hidden_size"] == 288
        and cfg["narrow-feature"]["student"]["from_teacher"] is None
    )


def test_every_prepare_command_runs_something():
    for name in PREPARE_COMMANDS:
        assert callable(command(name))


def test_quick_stand_in_keeps_depth_and_heads_and_student_widths_keep_their_ratio():
    real = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "head_dim": 64,
    }
    tiny = tiny_shape(real)
    assert (tiny["num_hidden_layers"], tiny["num_attention_heads"], tiny["num_key_value_heads"]) == (30, 9, 3)
    assert 32 <= tiny["hidden_size"] <= 64 and tiny["head_dim"] % 2 == 0
    narrow = shrink({"hidden_size": 288, "intermediate_size": 768, "head_dim": 32, "num_hidden_layers": 6}, real, tiny)
    assert (
        narrow["hidden_size"] / tiny["hidden_size"] == 288 / 576
        and narrow["intermediate_size"] / tiny["intermediate_size"] == 768 / 1536
    )
    assert narrow["head_dim"] % 2 == 0 and narrow["num_hidden_layers"] == 6


# ----------------------------------------------------------------------------- a quick study end to end


def _variants(out: Path) -> dict[str, dict]:
    return {v["name"]: v for v in json.loads((out / "study.json").read_text())["variants"]}


@pytest.mark.slow  # about 20 s, in process
def test_quick_study_of_lm_yaml_writes_a_row_and_a_curve_per_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNKD_CACHE", str(tmp_path / "no-assets"))  # as on a machine without them
    out = tmp_path / "study"
    study = load_study(LM)
    assert main(["study", str(LM), "--quick", "--out", str(out)]) == 0
    assert f"wrote {out / 'study.html'}" in capsys.readouterr().out
    rows = _variants(out)
    assert list(rows) == study.names
    for name, r in rows.items():
        assert r["status"] == "done" and r["steps"] == study.spec.quick.steps, (name, r)
        assert (
            math.isfinite(r["value"]) and r["value"] > 1 and r["params"] > 0 and math.isfinite(r["change_vs_reference"])
        )
        times = [p["train_s"] for p in r["curve"]]
        assert len(times) == study.spec.quick.steps and all(math.isfinite(t) for t in times) and times == sorted(times)
    assert rows["kl-even"]["change_vs_reference"] == 0.0
    ce = [p["value"] for p in rows["ce"]["curve"]]
    assert ce[-1] < ce[0], ce  # the generated text is learnable: three CE steps already lower the held-out perplexity
    assert rows["narrow-kl"]["params"] < rows["kl-even"]["params"]
    chosen = yaml.safe_load((out / "kl-search" / "config.yaml").read_text())["student"]["from_teacher"]["layers"]
    assert len(chosen) == 6  # search chose and recorded the blocks
    md = (out / "study.md").read_text()
    for name in study.names:
        assert re.search(rf"^\| {re.escape(name)} \| {study.spec.quick.steps} \|", md, re.MULTILINE), name
    assert "study_files/curves.png" in md and (out / "study_files" / "curves.png").stat().st_size > 0
    assert '<img id="plot-curves" src="data:image/png;base64,' in (out / "study.html").read_text()

    # --only reruns one variant and keeps the others' finished runs ...
    before = (out / "kl-even" / "metrics.jsonl").stat().st_mtime_ns
    run_study(study, out, quick=True, only=["ce"])
    rows = _variants(out)
    assert (
        all(r["status"] == "done" for r in rows.values())
        and (out / "kl-even" / "metrics.jsonl").stat().st_mtime_ns == before
    )
    # ... unless the study file changed what a kept run was made from.
    data = yaml.safe_load(LM.read_text())
    data["variants"][1]["set"] = {"losses": [{"type": "kl", "kind": "reverse"}]}  # kl-even, and nothing extends it
    changed = tmp_path / "lm.yaml"
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    run_study(load_study(changed), out, quick=True, only=["ce"])
    rows = _variants(out)
    assert rows["kl-even"]["status"] == "not run" and rows["ce"]["status"] == rows["minitron"]["status"] == "done"
