"""Never lose or mix work: atomic checkpoints, damaged ones skipped, existing runs kept, same results on resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import alignkd
import alignkd.errors
from alignkd import testing as tiny
from alignkd.config import ConfigError
from alignkd.engine.checkpoint import checkpoints, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safety")
    return tiny.save_model(root / "teacher", "llama", layers=2, width=32), tiny.write_corpus(root / "corpus")


def cfg_for(models, out: Path, **train) -> dict:
    teacher, corpus = models
    return {
        "teacher": {"path": str(teacher), "dtype": "float32"},
        "student": {"from_teacher": {"layers": [1]}},
        "data": {"train": str(corpus), "seq_len": 16, "eval_fraction": 0.1},
        "losses": [{"type": "kl"}, {"type": "hidden"}],
        "train": {
            "steps": 6,
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


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def test_a_second_run_into_a_run_folder_stops_and_overwrite_replaces_it(models, tmp_path):
    out = tmp_path / "run"
    alignkd.distill(cfg_for(models, out, steps=2))
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as e:
        alignkd.distill(cfg_for(models, out, steps=3))
    msg = str(e.value)
    assert "\n" not in msg and "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert (out / "metrics.jsonl").read_text() == log  # nothing touched
    with pytest.raises(ConfigError, match="contradict"):
        alignkd.distill(cfg_for(models, out, steps=3), resume=True, overwrite=True)
    alignkd.distill(cfg_for(models, out, steps=3), overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]  # the old run's log is gone
    assert [p.name for p in checkpoints(out)] == ["step-3"]  # and so are its checkpoints


@pytest.mark.slow
def test_the_cli_says_it_in_one_line_and_exits_2(models, tmp_path):
    out = tmp_path / "run"
    alignkd.distill(cfg_for(models, out, steps=1))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg_for(models, out, steps=2)))
    proc = subprocess.run(
        [sys.executable, "-m", "alignkd.cli", "distill", str(config)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"alignkd distill: error: train.output_dir {out} already holds a run; "
        "pass --resume to continue it or --overwrite to replace it"
    ]


def test_checkpoints_are_renamed_into_place_and_load_without_pickled_code(models, tmp_path):
    out = tmp_path / "run"
    alignkd.distill(cfg_for(models, out, steps=4, save_every=2, keep_checkpoints=5))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]  # no temporary folder left
    state = torch.load(root / "step-4" / "state.pt", weights_only=True)  # tensors and plain containers only
    assert set(state) == {"optimizer", "scheduler", "weighting", "rng"}
    meta = json.loads((root / "step-4" / "state.json").read_text())
    assert meta["step"] == 4 and set(meta) == {"step", "sampler", "sources", "train_seconds", "python_rng"}
    # A kill while writing leaves only a hidden temporary folder, which is never taken for a checkpoint.
    (root / ".step-6.tmp").mkdir()
    (root / ".step-6.tmp" / "side.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(out).name == "step-4"


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_state", "delete_state"])
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(models, tmp_path, damage):
    a, b = tmp_path / "a", tmp_path / "b"
    alignkd.distill(cfg_for(models, a))
    alignkd.distill(cfg_for(models, b, save_every=2, keep_checkpoints=5))
    # As if the run had been killed after writing step 4, whose files were then damaged.
    import shutil

    shutil.rmtree(b / "checkpoints" / "step-6")
    shutil.rmtree(b / "student")
    bad = b / "checkpoints" / "step-4"
    if damage == "truncate_weights":
        data = (bad / "side.safetensors").read_bytes()
        (bad / "side.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncate_state":
        data = (bad / "state.pt").read_bytes()
        (bad / "state.pt").write_bytes(data[: len(data) // 3])
    else:
        (bad / "state.pt").unlink()
    with pytest.warns(UserWarning, match="step-4 could not be loaded"):
        summary = alignkd.distill(cfg_for(models, b), resume=True)
    assert summary["last_train"]["step"] == 6
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"][-4:] == [3, 4, 5, 6]  # resumed from step 2
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), f"{k}: resuming from the earlier checkpoint changed the result"


def test_a_resume_that_changes_what_the_run_computes_names_the_keys(models, tmp_path):
    out = tmp_path / "run"
    alignkd.distill(cfg_for(models, out, steps=2))
    changed = cfg_for(models, out, steps=4, batch_size=2)
    changed["losses"][0]["temperature"] = 2.0
    with pytest.raises(ConfigError) as e:
        alignkd.distill(changed, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "train.batch_size (4 -> 2)" in msg and "losses" in msg
    assert [p.name for p in checkpoints(out)] == ["step-2"]
    # More steps, other logging and evaluation are fine; so is a moved folder.
    assert (
        alignkd.distill(cfg_for(models, out, steps=3, eval_every=1, log_every=2), resume=True)["last_train"]["step"]
        == 3
    )


# ----------------------------------------------------------------------------- numerical guards


def _nan_in(monkeypatch, term: str, steps: set[int]):
    """Make ``term`` NaN in the given (1-based) optimizer steps; returns the call counter."""
    import alignkd.engine.step as step_mod

    real, calls = step_mod.term_losses, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] in steps:
            losses[term] = losses[term] * float("nan")
        return losses

    monkeypatch.setattr(step_mod, "term_losses", poisoned)
    return calls


@pytest.mark.parametrize("weighting", ["static", "gradnorm", "uncertainty"])
def test_a_step_with_a_nan_term_is_skipped_and_named(models, tmp_path, monkeypatch, weighting):
    _nan_in(monkeypatch, "hidden", {2})
    cfg = cfg_for(models, tmp_path / "run", steps=4)
    cfg["weighting"] = {"strategy": weighting}
    alignkd.distill(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r.get("bad") for r in train] == [None, "hidden", None, None]
    assert train[1]["skipped"] == 1 and all(math.isfinite(r["loss"]) for r in train if "bad" not in r)
    assert all(math.isfinite(r[k]) for r in train for k in r if k.startswith("w/"))  # the weights were not poisoned
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


def test_a_skipped_step_changes_nothing_but_the_data_position(models, tmp_path, monkeypatch):
    # Step 1 applied, step 2 skipped: the student equals one trained on step 1 alone.
    one = tmp_path / "one"
    alignkd.distill(cfg_for(models, one, steps=1, warmup=0, min_lr_ratio=1.0))
    _nan_in(monkeypatch, "kl", {2})
    two = tmp_path / "two"
    alignkd.distill(cfg_for(models, two, steps=2, warmup=0, min_lr_ratio=1.0))
    a, b = weights(one), weights(two)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_repeated_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(models, tmp_path, monkeypatch):
    _nan_in(monkeypatch, "kl", set(range(3, 100)))
    out = tmp_path / "run"
    with pytest.raises(alignkd.errors.TrainingError) as e:
        alignkd.distill(cfg_for(models, out, steps=20, save_every=2, max_bad_steps=3))
    msg = str(e.value)
    assert "\n" not in msg and "3 steps in a row had a non-finite kl" in msg and "step-2" in msg
    assert [p.name for p in checkpoints(out)] == ["step-2"]  # intact: nothing saved after the bad steps
    assert not (out / "student").exists()


# ----------------------------------------------------------------------------- kills and preemption


def _cli_env() -> dict:
    import os

    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def _start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alignkd.cli", "distill", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=_cli_env(),
    )


def _wait_for_steps(proc: subprocess.Popen, log: Path, steps: int) -> None:
    import time

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {steps}: {proc.communicate()[1][-2000:]}")


def _curve(out: Path) -> dict[int, float]:
    """Training loss per step; a step logged twice (before a kill, then after the resume) keeps its last record."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


# On-policy: half the micro-batches are the student's samples (drawn in the step they train), half the data.
ON_POLICY = {"sources": {"dataset": 0.5, "student": 0.5}, "prompt_tokens": 4, "max_new_tokens": 8}


@pytest.fixture(scope="module", params=["data", "on_policy"])
def reference(models, tmp_path_factory, request) -> tuple[dict, Path]:
    """An uninterrupted 30-step run (on the data, or on-policy): its config (as a dict) and its output folder."""
    root = tmp_path_factory.mktemp("reference")
    cfg = cfg_for(models, root / "run", steps=30, save_every=1, keep_checkpoints=2)
    if request.param == "on_policy":
        cfg["generation"] = ON_POLICY
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "alignkd.cli", "distill", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_cli_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cfg, root / "run"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_curve(reference, tmp_path):
    import random
    import signal

    cfg, ref = reference
    cfg = {**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path / "run")}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    kill_after = random.Random(0).randint(3, 25)
    proc = _start(config)
    _wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl", kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(
        [sys.executable, "-m", "alignkd.cli", "distill", str(config), "--resume"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_cli_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    want, got = _curve(ref), _curve(tmp_path / "run")
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-9), (
            f"step {step} after a kill at step >= {kill_after}"
        )


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(reference, tmp_path):
    import signal

    cfg, ref = reference
    cfg = {**cfg, "train": {**cfg["train"], "save_every": 0, "output_dir": str(tmp_path / "run")}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = _start(config)
    _wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    (line,) = [line for line in out.splitlines() if line.strip()]
    assert line.startswith("stopped by SIGTERM: saved a checkpoint at step ") and line.endswith(
        "continue with --resume"
    )
    step = int(line.split("at step ")[1].split()[0])
    assert [p.name for p in checkpoints(tmp_path / "run")] == [f"step-{step}"] and 5 <= step < 30
    assert not (tmp_path / "run" / "student").exists()
    done = subprocess.run(
        [sys.executable, "-m", "alignkd.cli", "distill", str(config), "--resume"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_cli_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    want, got = _curve(ref), _curve(tmp_path / "run")
    assert sorted(got) == list(range(1, 31))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-9), s


@pytest.mark.parametrize(
    ("written", "processes", "launch"),
    [
        ({"sharded_over": 2}, 1, None),
        ({"sharded_over": 2}, 4, "fsdp"),
        ({}, 2, "fsdp"),
        ({"zero2_over": 2}, 2, "fsdp"),
        ({"zero2_over": 2}, 1, None),
        ({"zero2_over": 2}, 2, 3),
        ({"sharded_over": 2}, 2, 2),
    ],
)
def test_a_checkpoint_of_another_launch_is_refused_not_skipped(tmp_path, written, processes, launch):
    """Per-process checkpoints (FSDP shards, ZeRO partitions of a stage).

    Another launch must stop with one line, not fall back to an older checkpoint.
    """
    from types import SimpleNamespace

    from alignkd.engine.checkpoint import resume_latest

    ckpt = tmp_path / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, **written}))
    from alignkd.backend import FSDP2, Backend, ZeRO

    acc = SimpleNamespace(num_processes=processes, process_index=0)
    backend = (
        FSDP2(acc) if launch == "fsdp" else ZeRO(acc, {"stage": launch}) if isinstance(launch, int) else Backend(acc)
    )
    run = SimpleNamespace(out=tmp_path, accelerator=acc, backend=backend, side=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError) as info:
        resume_latest(run, say=lambda msg: None)
    assert "\n" not in str(info.value) and "resume it the same way" in str(info.value)
