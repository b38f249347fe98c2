"""Experiment trackers (``train.report_to``): what a tiny run sends them, read back from their own files.

wandb runs in offline mode and is read from its ``.wandb`` file (a LevelDB-style
log of protobuf records, read here with wandb's own ``Record`` message); MLflow
writes to a file store and is read back with its client. Neither touches the
network. TensorBoard is not installed where these tests were written: the
default then writes ``metrics.jsonl`` alone, as before there was a choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.tracking import get_available_trackers
from test_engine import make_cfg, read_metrics

import alignkd
from alignkd.config import load_config
from alignkd.config.validate import TRACKERS
from alignkd.engine.trackers import chosen, numbers, tracking
from alignkd.errors import ConfigError

INSTALLED = {str(t) for t in get_available_trackers()}
KL = [{"type": "kl"}]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline and MLflow on a file store under ``tmp_path``, nothing written to the home folder."""
    for key in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    home = tmp_path / "tracker_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(home / key.lower()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return tmp_path


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (checksum, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(record)
            yield r


def wandb_run(run_dir: Path) -> tuple[dict, dict, dict[int, dict]]:
    """(run record fields, config, history rows by step) of one offline run folder."""
    (path,) = run_dir.glob("run-*.wandb")
    run, config, history = {}, {}, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"id": r.run.run_id, "name": r.run.display_name, "project": r.run.project}
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[row.pop("_step")] = row
    return run, config, history


def expected_rows(out: Path) -> dict[int, dict]:
    """What the trackers should hold: metrics.jsonl's numbers per step, the train and eval records of a step merged."""
    rows, evals = read_metrics(out)
    by_step: dict[int, dict] = {}
    for r in rows + evals:
        by_step.setdefault(r["step"], {}).update(numbers(r))
    return by_step


# ---------------------------------------------------------------- the setting


def cfg_with(tmp_path, report_to):
    data = make_cfg(tmp_path / "teacher", tmp_path / "train.txt", tmp_path / "out", losses=KL, report_to=report_to)
    return load_config(data=data)


@pytest.mark.parametrize(
    ("given", "resolved"),
    [(None, None), ("wandb", ["wandb"]), ("none", []), (["none"], []), ([], []), (["mlflow", "wandb"], None)],
)
def test_report_to_takes_a_name_a_list_or_none(tmp_path, given, resolved):
    cfg = cfg_with(tmp_path, given)
    assert cfg.train.report_to == (given if resolved is None else resolved)


def test_an_unknown_tracker_is_one_line_with_the_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.report_to\[1\]: 'wandbb' is not one of tensorboard, wandb, mlflow"):
        cfg_with(tmp_path, ["mlflow", "wandbb"])
    with pytest.raises(ConfigError, match="did you mean 'wandb'"):
        cfg_with(tmp_path, ["wandbb"])
    with pytest.raises(ConfigError, match="none means no tracker"):
        cfg_with(tmp_path, ["none", "wandb"])


def test_a_named_tracker_that_is_not_installed_stops_the_run_before_it_writes(tmp_path):
    missing = [t for t in TRACKERS if t not in INSTALLED]
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed here")
    cfg = cfg_with(tmp_path, [missing[0]])
    with pytest.raises(ConfigError) as e:
        alignkd.distill(cfg)
    assert str(e.value) == (
        f"train.report_to: {missing[0]} is not installed; pip install {missing[0]}, or remove it from train.report_to"
    )
    assert not (tmp_path / "out").exists()


def test_the_default_is_tensorboard_where_it_is_installed(tmp_path):
    assert chosen(cfg_with(tmp_path, None)) == (["tensorboard"] if "tensorboard" in INSTALLED else [])
    assert chosen(cfg_with(tmp_path, [])) == []
    if "mlflow" in INSTALLED:
        assert chosen(cfg_with(tmp_path, ["mlflow", "mlflow"])) == ["mlflow"]


def test_numbers_are_the_record_numbers_under_its_split():
    record = {"split": "train", "step": 3, "loss": 0.5, "loss/kl": 0.25, "bad": "kl", "skipped": 1, "sources": "x"}
    assert numbers(record) == {"train/loss": 0.5, "train/loss.kl": 0.25, "train/skipped": 1}
    assert numbers({"split": "eval", "step": 3, "eval_loss": 2.0, "train_s": 1.5}) == {
        "eval/eval_loss": 2.0,
        "eval/train_s": 1.5,
    }


def test_only_the_main_process_starts_trackers(tmp_path):
    started = []
    acc = SimpleNamespace(log_with=["wandb"], is_main_process=False, init_trackers=lambda *a, **k: started.append(a))
    with tracking(acc, cfg_with(tmp_path, ["wandb"]), "precision: x", resume=False):
        pass
    assert started == []
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- real runs


def test_without_trackers_a_run_writes_metrics_jsonl_alone(teacher, corpus, tmp_path):
    if "tensorboard" in INSTALLED:
        pytest.skip("tensorboard is installed: the default reports to it")
    out = tmp_path / "out"
    alignkd.distill(make_cfg(teacher, corpus, out, losses=KL, steps=2))
    rows, evals = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and [r["step"] for r in evals] == [2]
    assert not any((out / p).exists() for p in ("tensorboard", "wandb", "trackers.json"))


@pytest.mark.slow  # wandb runs its service in a subprocess
def test_wandb_offline_run_holds_the_config_precision_and_every_record(teacher, corpus, offline):
    pytest.importorskip("wandb")
    out, wandb_dir = offline / "out", offline / "wandb_dir"
    wandb_dir.mkdir()
    cfg = make_cfg(
        teacher, corpus, out, losses=KL, steps=3, eval_every=2, report_to=["wandb"], project="kd-tests", run_name="tiny"
    )
    with pytest.MonkeyPatch.context() as m:
        m.setenv("WANDB_DIR", str(wandb_dir))
        summary = alignkd.distill(cfg)
    assert not (out / "wandb").exists()  # WANDB_DIR decides where its files go
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    run, config, history = wandb_run(run_dir)
    ids = json.loads((out / "trackers.json").read_text())
    assert run == {"id": ids["wandb"], "name": "tiny", "project": "kd-tests"}
    assert config["train.lr"] == cfg["train"]["lr"] and config["losses.0.type"] == "kl"
    assert config["student.from_teacher.layers"] == "[1]"
    precision = summary["precision"]
    assert config["precision"].startswith(
        f"precision: teacher {precision['teacher_dtype']}, student {precision['student_dtype']}"
    )
    expected = expected_rows(out)
    assert sorted(history) == sorted(expected) == [1, 2, 3]
    for step, row in expected.items():
        assert {k: history[step][k] for k in row} == pytest.approx(row), f"step {step}"
    assert "eval/eval_loss" in history[2] and "train/loss.kl" in history[3]


@pytest.mark.slow  # wandb runs its service in a subprocess
def test_resume_continues_the_same_wandb_and_mlflow_runs(teacher, corpus, offline):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    out = offline / "out"
    cfg = make_cfg(teacher, corpus, out, losses=KL, steps=2, eval_every=2, report_to=["wandb", "mlflow"])
    alignkd.distill(cfg)
    ids = json.loads((out / "trackers.json").read_text())
    alignkd.distill(cfg, resume=True, overrides=["train.steps=4"])  # steps: a setting a resume may change
    assert json.loads((out / "trackers.json").read_text()) == ids
    expected = expected_rows(out)
    assert sorted(expected) == [1, 2, 3, 4]

    # wandb: its files in the output folder, one offline folder per session, both the same run
    first, second = sorted((out / "wandb").glob("offline-run-*"))
    (run1, config, h1), (run2, _, h2) = wandb_run(first), wandb_run(second)
    assert run1["id"] == run2["id"] == ids["wandb"] and run1["name"] == out.name
    assert config["train.steps"] == 2 and (sorted(h1), sorted(h2)) == ([1, 2], [3, 4])

    # MLflow: one run in the experiment, every metric's history by step; a parameter keeps its first value
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("alignkd")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.run_name == out.name and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "2" and run.data.params["train.lr"] == str(cfg["train"]["lr"])
    assert run.data.params["precision"].startswith("precision: teacher float32")
    keys = {k for row in expected.values() for k in row}
    assert set(run.data.metrics) == keys
    for key in ("train/loss", "train/loss.kl", "train/lr", "eval/eval_loss"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({s: row[key] for s, row in expected.items() if key in row}), key


@pytest.mark.parametrize("report_to", [["mlflow"], pytest.param(["wandb", "mlflow"], marks=pytest.mark.slow)])
def test_a_tracker_that_cannot_start_is_one_line_naming_it(teacher, corpus, offline, monkeypatch, report_to):
    for name in report_to:
        pytest.importorskip(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nope://nowhere")
    with pytest.raises(ConfigError, match=r"^train\.report_to: mlflow did not start \(.*remove it from") as e:
        alignkd.distill(make_cfg(teacher, corpus, offline / "out", losses=KL, steps=1, report_to=report_to))
    assert "\n" not in str(e.value)


def test_a_run_that_stops_on_an_error_marks_its_mlflow_run_failed(teacher, corpus, offline, monkeypatch):
    mlflow = pytest.importorskip("mlflow")

    def fail(run, start):
        raise RuntimeError("stopped in the loop")

    monkeypatch.setattr("alignkd.engine.run.train", fail)
    out = offline / "out"
    with pytest.raises(RuntimeError, match="stopped in the loop"):
        alignkd.distill(make_cfg(teacher, corpus, out, losses=KL, steps=1, report_to=["mlflow"]))
    run = mlflow.tracking.MlflowClient().get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FAILED" and run.data.params["train.steps"] == "1"
    assert mlflow.active_run() is None
