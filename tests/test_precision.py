"""Precision resolved from the hardware, the time budget, and plain progress lines off a terminal."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml
from rich.console import Console

import alignkd
from alignkd import precision
from alignkd import testing as tiny
from alignkd.display import Progress
from alignkd.engine.horizon import Horizon


@pytest.fixture(autouse=True)
def fresh_probe():
    precision.cpu_bf16.cache_clear()
    yield
    precision.cpu_bf16.cache_clear()


def fake_cpu(monkeypatch, flags: set[str] | None, bf16_s: float, f32_s: float = 1.0, machine: str = "x86_64") -> list:
    timed: list = []

    def seconds(dtype, **kw):
        timed.append(dtype)
        return bf16_s if dtype == torch.bfloat16 else f32_s

    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "_matmul_seconds", seconds)
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    return timed


def test_avx2_cpu_is_float32_without_timing_anything(monkeypatch):
    timed = fake_cpu(monkeypatch, {"avx2", "fma"}, bf16_s=0.5)
    assert not precision.cpu_bf16().fast
    assert timed == []  # the flags decide; no matmul is run
    assert precision.resolve_dtype("auto", "cpu") == "float32"
    assert precision.resolve_mixed_precision("auto", "cpu") == "no"


def test_bf16_flags_and_a_fast_matmul_give_bfloat16(monkeypatch):
    fake_cpu(monkeypatch, {"avx2", "avx512_bf16", "amx_bf16"}, bf16_s=0.3)
    support = precision.cpu_bf16()
    assert support.fast and "avx512_bf16/amx_bf16" in support.reason
    assert precision.resolve_dtype("auto", "cpu") == "bfloat16"
    assert precision.resolve_mixed_precision("auto", "cpu") == "bf16"


def test_bf16_flags_but_a_slow_matmul_give_float32(monkeypatch):
    # e.g. oneDNN held to AVX2 by ONEDNN_MAX_CPU_ISA on a CPU that has AMX
    fake_cpu(monkeypatch, {"avx512_bf16"}, bf16_s=20.0)
    assert not precision.cpu_bf16().fast
    assert precision.resolve_dtype("auto", "cpu") == "float32"


@pytest.mark.parametrize("bf16_s,fast", [(0.5, True), (1.25, True), (3.0, False)])
def test_cpus_whose_flags_cannot_be_read_are_timed(monkeypatch, bf16_s, fast):
    timed = fake_cpu(monkeypatch, None, bf16_s=bf16_s, machine="arm64")
    assert precision.cpu_bf16().fast is fast
    assert set(timed) == {torch.bfloat16, torch.float32}


def test_the_probe_runs_once_per_process(monkeypatch):
    timed = fake_cpu(monkeypatch, {"amx_bf16"}, bf16_s=0.1)
    for _ in range(3):
        precision.resolve_dtype("auto", "cpu")
    assert len(timed) == 2


@pytest.mark.parametrize("supported", [True, False])
def test_cuda_follows_its_bf16_support(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert precision.resolve_dtype("auto", "cuda") == ("bfloat16" if supported else "float32")
    assert precision.resolve_mixed_precision("auto", "cuda") == ("bf16" if supported else "no")


def test_other_devices_and_explicit_settings():
    assert precision.resolve_dtype("auto", "mps") == "float32"
    assert precision.resolve_dtype("float16", "cpu") == "float16"
    assert precision.resolve_mixed_precision("fp16", "cpu") == "fp16"
    assert precision.resolve_student_dtype("auto") == "float32"  # AdamW's master weights
    assert precision.resolve_student_dtype("bfloat16") == "bfloat16"


def test_the_real_probe_agrees_with_a_real_matmul_timing():
    support = precision.cpu_bf16()
    ratio = precision._matmul_seconds(torch.bfloat16) / precision._matmul_seconds(torch.float32)
    flags = precision._cpu_flags() or set()
    if support.fast:
        assert ratio < 3.0, support.reason  # fast was decided on a ratio <= 1.25; allow noise
    elif any(f in flags for f in precision.BF16_CPU_FLAGS):
        assert ratio > 1.0, support.reason


def _run_cfg(tmp_path, **train) -> dict:
    teacher = tiny.save_model(tmp_path / "teacher", "llama", layers=2, width=32)
    corpus = tiny.write_corpus(tmp_path / "corpus", docs=4)
    return {
        "teacher": {"path": str(teacher)},
        "student": {"from_teacher": {"layers": [1]}},
        "data": {"train": str(corpus), "seq_len": 16, "eval_fraction": 0.1},
        "losses": [{"type": "kl"}, {"type": "ce"}],
        "train": {
            "steps": 2,
            "batch_size": 2,
            "warmup": 0,
            "progress": False,
            "eval_batches": 1,
            "output_dir": str(tmp_path / "run"),
            **train,
        },
    }


@pytest.mark.parametrize("fast", [True, False])
def test_a_run_writes_and_says_its_resolved_precision(tmp_path, monkeypatch, capsys, fast):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.Bf16Support(fast, "forced by the test"))
    cfg = _run_cfg(tmp_path)
    capsys.readouterr()
    summary = alignkd.distill(cfg)
    want = {
        "teacher_dtype": "bfloat16" if fast else "float32",
        "student_dtype": "float32",
        "mixed_precision": "bf16" if fast else "no",
    }
    assert summary["precision"] == want
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == want
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["teacher"]["dtype"], saved["student"]["dtype"], saved["train"]["mixed_precision"]) == tuple(
        want.values()
    )
    ours = [
        line for line in capsys.readouterr().err.strip().splitlines() if "it/s]" not in line
    ]  # not HF's loading bars
    first = ours[0]
    assert first.startswith(
        f"precision: teacher {want['teacher_dtype']}, student float32, autocast {want['mixed_precision']}"
    )


# ----------------------------------------------------------------------------- time budget


def test_horizon_without_a_budget_is_the_step_count():
    h = Horizon(100)
    h.advance(10, 1e6)
    assert h.total == 100 and not h.finished(99) and h.finished(100)


def test_horizon_projects_the_last_step_from_the_time_per_step():
    h = Horizon(100, max_seconds=60.0)
    h.advance(1, 2.0)  # 2 s per step: 29 more fit in the 58 s left
    assert h.total == 30
    h.advance(10, 30.0)  # 3 s per step: 10 more fit in 30 s
    assert h.total == 20
    h.advance(20, 61.0)  # over budget: this step is the last
    assert h.total == 20 and h.finished(20)
    fast = Horizon(100, max_seconds=60.0)
    fast.advance(1, 0.01)
    assert fast.total == 100  # never past steps


def test_horizon_resumes_with_the_time_already_spent():
    h = Horizon(100, max_seconds=60.0)
    h.resume(10, 40.0)  # a checkpoint at step 10 after 40 s
    h.advance(11, 42.0)  # 2 s per step since the resume: 9 more fit in 18 s
    assert h.total == 20 and h.elapsed == 42.0


def test_a_run_with_a_time_budget_stops_early_and_ends_its_schedule(tmp_path):
    cfg = _run_cfg(tmp_path, steps=1000, max_minutes=1e-6, mixed_precision="no", min_lr_ratio=0.1, lr=1e-3)
    summary = alignkd.distill(cfg)
    assert summary["steps"] == 1  # the budget ran out during the first step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1]
    assert any(r["split"] == "eval" for r in records)  # the last step is evaluated and saved
    assert (tmp_path / "run" / "checkpoints" / "step-1").is_dir()


# ----------------------------------------------------------------------------- progress off a terminal


def test_progress_prints_plain_lines_when_not_on_a_terminal(monkeypatch):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    monkeypatch.setattr("alignkd.display.PLAIN_EVERY_S", 0.0)
    p = Progress(3, console=console)
    for step in (1, 2, 3):
        p.update(step, {"loss": 1.5, "loss/kl": 0.25, "tokens_per_s": 1000.0})
    p.stop()
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 1/3 loss=1.5 kl=0.25 1000 tok/s elapsed 0:00:00 eta ")


def test_a_progress_line_tells_sampling_from_training(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("alignkd.display.PLAIN_EVERY_S", 0.0)
    p = Progress(2, console=Console(file=out, force_terminal=False, width=200))
    p.update(1, {"loss": 1.0, "tokens_per_s": 900.0, "generated_tokens": 0, "gen_share": 0.0})
    p.update(
        2,
        {"loss": 1.0, "tokens_per_s": 900.0, "generated_tokens": 64, "generated_tokens_per_s": 120.0, "gen_share": 0.4},
    )
    first, second = out.getvalue().strip().splitlines()
    assert "sampled" not in first
    assert "900 tok/s | sampled 120 tok/s, 40% of step" in second


def test_progress_lines_are_spaced_in_time(monkeypatch):
    out = io.StringIO()
    p = Progress(100, console=Console(file=out, force_terminal=False, width=200))
    for step in range(1, 101):
        p.update(step, {"loss": 1.0, "tokens_per_s": 1.0})
    # The first and the last step; the rest came within PLAIN_EVERY_S of each other.
    assert [line.split()[1] for line in out.getvalue().strip().splitlines()] == ["1/100", "100/100"]
