"""benchmarks/kd_step.py without timing anything: its options, case list, configs and fallback JSD.

The benchmark runs in a child interpreter (``run_in_repo``): tests do not import benchmarks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_in_repo

from alignkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts a Python process

# Each argument through kd_step.parse_cases: {"cases": [...]} or {"error": the ArgumentTypeError's message}.
PARSE = """
import argparse, json, sys
from benchmarks.kd_step import parse_cases
out = []
for text in sys.argv[1:]:
    try:
        out.append({"cases": parse_cases(text)})
    except argparse.ArgumentTypeError as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""
# kd_step.run_config(spec, case) of every case in kd_step.LOSSES, with LOSSES and BATCH.
CONFIGS = """
import json, sys
from benchmarks import kd_step
spec = json.loads(sys.argv[1])
configs = {case: kd_step.run_config(spec, case) for case in kd_step.LOSSES}
print(json.dumps({"losses": kd_step.LOSSES, "batch": kd_step.BATCH, "configs": configs}))
"""
# kd_step.gjsd_here on the (student, teacher, labels) saved in argv[1], at the betas that follow.
JSD = """
import json, sys, torch
from benchmarks.kd_step import gjsd_here
s, t, labels = torch.load(sys.argv[1])
got = {beta: gjsd_here(s, t, labels, float(beta)).item() for beta in sys.argv[2:]}
print(json.dumps({"jsd": got, "self": gjsd_here(s, s, labels, 0.5).item()}))
"""


def test_help_runs_without_heavy_imports():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.kd_step", "--help"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "--cases" in out.stdout and "--avx2" in out.stdout


def test_cases_parse_expand_and_reject():
    expanded, alone, unknown, empty = run_in_repo(PARSE, "a, e,f,a", "e-hidden", "a,z", " , ")
    assert expanded == {"cases": ["a", "e-logits", "e-hidden", "f"]}
    assert alone == {"cases": ["e-hidden"]}
    assert "error" in unknown and re.search("unknown case 'z'", unknown["error"])
    assert "error" in empty


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
    bench = run_in_repo(CONFIGS, json.dumps(spec))
    for case, losses in bench["losses"].items():
        over = [f"teacher.cache={tmp_path / 'cache'}"] if case.startswith("e-") else []
        cfg = load_config(data=bench["configs"][case], overrides=over)
        assert [t.type for t in cfg.losses] == [t["type"] for t in losses]
        autocast = "bf16" if case.endswith("-bf16") else "no"  # g-bf16: bf16 autocast, every other case float32
        got = (cfg.teacher.dtype, cfg.train.mixed_precision, cfg.train.batch_size)
        assert got == ("float32", autocast, bench["batch"]), case


def test_fallback_jsd_matches_a_float64_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    torch.save((s, t, labels), tmp_path / "inputs.pt")
    betas = (0.2, 0.5)
    bench = run_in_repo(JSD, str(tmp_path / "inputs.pt"), *map(str, betas))
    for beta in betas:
        p, q = t.double().softmax(-1), s.double().softmax(-1)  # teacher, student
        m = beta * p + (1 - beta) * q
        per = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        want = per[labels != -100].mean()
        assert torch.allclose(torch.tensor(bench["jsd"][str(beta)], dtype=torch.float64), want, atol=1e-6)
    assert abs(bench["self"]) < 1e-6
