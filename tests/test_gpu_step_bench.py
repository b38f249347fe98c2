"""benchmarks/gpu_step.py on the CPU with its tiny pair: it runs end to end, and its MFU arithmetic is the formula's.

The benchmark runs in a child interpreter: tests do not import benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_in_repo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts a Python process

SIZES = ["1.5b-0.5b", "tiny"]  # gpu_step.SIZES, checked below
# gpu_step.student_params of SIZES[argv[1]]'s student and teacher; for the tiny pair, also
# gpu_step.matmul_params of both built (random weights, untied heads).
PARAMS = """
import json, sys
from benchmarks import gpu_step
size = sys.argv[1]
t_cfg, s_over = gpu_step.SIZES[size]
got = {"sizes": sorted(gpu_step.SIZES)}
got["student"], got["teacher"] = gpu_step.student_params(t_cfg, s_over), gpu_step.student_params(t_cfg, {})
if size == "tiny":
    from transformers import LlamaConfig, LlamaForCausalLM
    student = LlamaForCausalLM(LlamaConfig(**{**t_cfg, **s_over}, tie_word_embeddings=False))
    teacher = LlamaForCausalLM(LlamaConfig(**t_cfg, tie_word_embeddings=False))
    got["built_student"], got["built_teacher"] = gpu_step.matmul_params(student), gpu_step.matmul_params(teacher)
print(json.dumps(got))
"""


@pytest.mark.parametrize("size", SIZES)
def test_student_parameters_from_the_config_match_a_built_model(size):
    got = run_in_repo(PARAMS, size)
    assert got["sizes"] == sorted(SIZES), "a size gpu_step.SIZES has and this test does not"
    if size != "tiny":  # the real pair: check the counts from the configs against the sizes it promises
        assert 0.45e9 < got["student"] < 0.55e9
        assert 1.4e9 < got["teacher"] < 1.65e9
        return
    assert got["student"] == got["built_student"]
    assert got["teacher"] == got["built_teacher"]


# The benchmark at its tiny size on the CPU: one float32 step of 2 x 64 tokens.
TINY_CPU_RUN = [
    sys.executable, "-m", "benchmarks.gpu_step", "--size", "tiny", "--device", "cpu",
    "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "64", "--autocast", "no", "--dtype", "float32",
]  # fmt: skip


def test_a_tiny_run_on_the_cpu_prints_every_case_and_its_mfu(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run(
        [
            *TINY_CPU_RUN,
            "--peak-tflops",
            "0.5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert set(got["results"]) == {"a", "c", "d"}
    n_s, n_t, tokens = got["params"]["student"], got["params"]["teacher"], 2 * 64
    for case, r in got["results"].items():
        assert r["s"] > 0, (case, r)
        flops = (6 * n_s + (0 if case == "a" else 2 * n_t)) * tokens
        assert r["mfu"] == pytest.approx(flops / r["s"] / 0.5e12)
    assert "MFU" in run.stdout and "0.5 TFLOP/s" in run.stdout
    assert "FSDP2" not in run.stdout


def test_the_fsdp_launch_shards_the_student(tmp_path):
    run = subprocess.run(
        [
            *TINY_CPU_RUN,
            "--cases",
            "c",
            "--launch",
            "fsdp",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "student sharded (FSDP2)" in run.stdout
