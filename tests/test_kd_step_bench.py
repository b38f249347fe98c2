"""benchmarks/kd_step.py without timing anything: its options, case list, configs and fallback JSD."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkd.config import load_config
from benchmarks import kd_step

ROOT = Path(__file__).resolve().parents[1]


def test_help_runs_without_heavy_imports():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.kd_step", "--help"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "--cases" in out.stdout and "--avx2" in out.stdout


def test_cases_parse_expand_and_reject():
    assert kd_step.parse_cases("a, e,f,a") == ["a", "e-logits", "e-hidden", "f"]
    assert kd_step.parse_cases("e-hidden") == ["e-hidden"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown case 'g'"):
        kd_step.parse_cases("a,g")
    with pytest.raises(argparse.ArgumentTypeError):
        kd_step.parse_cases(" , ")


def test_every_alignkd_case_is_a_valid_config(tmp_path):
    spec = {
        "teacher": "t",
        "corpus": "c",
        "layers": [0, 6, 12, 18, 24, 29],
        "max_train_tokens": 4096,
        "warmup": 1,
        "steps": 2,
        "work": str(tmp_path),
    }
    for case, losses in kd_step.LOSSES.items():
        over = [f"teacher.cache={tmp_path / 'cache'}"] if case.startswith("e-") else []
        cfg = load_config(data=kd_step.run_config(spec, case), overrides=over)
        assert [t.type for t in cfg.losses] == [t["type"] for t in losses]
        assert (cfg.teacher.dtype, cfg.train.mixed_precision, cfg.train.batch_size) == ("float32", "no", kd_step.BATCH)


def test_fallback_jsd_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    for beta in (0.2, 0.5):
        p, q = t.double().softmax(-1), s.double().softmax(-1)  # teacher, student
        m = beta * p + (1 - beta) * q
        per = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        want = per[labels != -100].mean()
        assert torch.allclose(kd_step.gjsd_here(s, t, labels, beta).double(), want, atol=1e-6)
    assert kd_step.gjsd_here(s, s, labels, 0.5).abs() < 1e-6
