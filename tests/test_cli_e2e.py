"""End to end: the ``alignkd distill`` command on CPU, as a user runs it.

A tiny 2-block llama teacher is first trained for a few seconds on the corpus
(so it knows something worth distilling), then the real CLI, in a subprocess,
distils it into a narrower 1-block student with KL + CE + hidden-state terms.
The test checks the exit code, that the training loss went down, every file the
run promises, the metrics records, and that the student reloads with
transformers alone in a process that never imports alignkd. Bad input (a layer
the teacher lacks, a missing data file, a misspelled key) exits 2 with one line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignkd import testing as tiny

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
STEPS = 40
TERMS = ("kl", "ce", "hidden")

pytestmark = pytest.mark.slow  # every test runs the CLI in a new process


def train_teacher(path: Path, corpus: Path, steps: int = 150) -> float:
    """Plain next-token training of a 2-block, 64-wide llama on ``corpus``; returns the last loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_teacher(path, corpus, steps)
    finally:
        torch.set_num_threads(threads)


def _train_teacher(path: Path, corpus: Path, steps: int) -> float:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("llama", layers=2, width=64))
    tok = tiny.byte_tokenizer()
    text = "".join(p.read_text() for p in sorted(corpus.glob("*.txt")))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    blocks = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return loss.item()


# Width-32 models are far too small for two threads to pay: on a busy 2-core
# machine the threads' spin-waits made steps ~7x slower. One thread everywhere.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# The installed console script when there is one (it is what users run), else the module.
SCRIPT = Path(sys.executable).with_name("alignkd")
COMMAND = [sys.executable, str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "alignkd.cli"]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``alignkd <args>`` in a fresh interpreter."""
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def config_file(workdir) -> Path:
    """A trained teacher, the corpus and a YAML config that distils it into a 1-block, 32-wide student."""
    corpus = tiny.write_corpus(workdir / "corpus")
    last_loss = train_teacher(workdir / "teacher", corpus)
    assert last_loss < 2.0, f"the teacher did not learn the corpus (loss {last_loss:.3f})"
    cfg = {
        "teacher": {"path": str(workdir / "teacher"), "dtype": "float32"},
        "student": {"config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}},
        "data": {"train": str(corpus), "seq_len": SEQ_LEN, "eval_fraction": 0.1},
        "losses": [
            {"type": "kl", "temperature": 2.0},
            {"type": "ce", "weight": 0.5},
            {"type": "hidden", "metric": "mse", "layers": [[0, 1]]},
        ],
        "train": {
            "steps": 10,
            "batch_size": 8,
            "lr": 3.0e-3,
            "warmup": 5,
            "eval_every": 20,
            "eval_batches": 2,
            "save_every": 20,
            "mixed_precision": "no",
            "progress": False,
            "output_dir": str(workdir / "run"),
        },
    }
    path = workdir / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(config_file, workdir) -> tuple[subprocess.CompletedProcess, Path]:
    """The distillation, with one dotted override (``train.steps``) as a user would pass it."""
    proc = cli("distill", str(config_file), f"train.steps={STEPS}")
    return proc, workdir / "run"


def test_distill_exits_0_and_the_loss_goes_down(run):
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student saved to" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < first, f"training loss did not go down: first 5 mean {first:.4f}, last 5 mean {last:.4f}"


def test_distill_writes_every_promised_file(run):
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in (
        "metrics.jsonl",
        "config.yaml",
        "summary.json",
        "projectors.safetensors",
        "student/config.json",
        "student/model.safetensors",
        "student/tokenizer.json",
        "student/tokenizer_config.json",
        "checkpoints/step-20/side.safetensors",
        "checkpoints/step-20/state.pt",
        f"checkpoints/step-{STEPS}/side.safetensors",
        f"checkpoints/step-{STEPS}/state.pt",
    ):
        assert (out / rel).is_file(), (
            f"{rel} missing; the run wrote {sorted(str(p.relative_to(out)) for p in out.rglob('*'))}"
        )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == STEPS  # the resolved config, overrides applied
    assert [loss["name"] for loss in saved["losses"]] == list(TERMS)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {
        "steps",
        "teacher_params",
        "student_params",
        "teacher_eval",
        "student_eval",
        "last_train",
        "student_dir",
    }
    assert summary["steps"] == STEPS and summary["student_params"] < summary["teacher_params"]
    assert math.isfinite(summary["student_eval"]["eval_loss"])


def test_metrics_records_have_every_key(run):
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    keys = (
        {"step", "loss", "lr", "tokens_per_s", "grad_norm"} | {f"loss/{t}" for t in TERMS} | {f"w/{t}" for t in TERMS}
    )
    for r in train:
        assert keys <= set(r), f"step {r['step']} lacks {sorted(keys - set(r))}"
        assert all(math.isfinite(r[k]) for k in keys), r
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and math.isfinite(r["eval_ppl"]) and r["eval_ppl"] > 1


def test_student_reloads_with_transformers_alone(run, workdir):
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(out / "student")!r}
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all(), "non-finite logits"
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size), logits.shape
        assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
        assert "alignkd" not in sys.modules, "alignkd was imported"
        print("ok", ids.shape[1])
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def test_resume_flag_continues_from_the_latest_checkpoint(run, config_file, workdir):
    """``--resume`` in a new process picks up step 20 and ends where the uninterrupted run ended."""
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = workdir / "resumed"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(again / "student")
    res = cli("distill", str(config_file), f"train.steps={STEPS}", f"train.output_dir={again}", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "step 20" in res.stderr, res.stderr[-2000:]
    rows = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1)) + list(range(21, STEPS + 1))
    want, got = (
        load_file(str(out / "student" / "model.safetensors")),
        load_file(str(again / "student" / "model.safetensors")),
    )
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-5), f"{k} differs after --resume"


def test_print_config_prints_the_resolved_config(config_file, workdir):
    printed = workdir / "printed"
    proc = cli(
        "distill",
        str(config_file),
        "train.steps=7",
        "losses.1.weight=2",
        f"train.output_dir={printed}",
        "--print-config",
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["losses"][1]["weight"] == 2.0
    assert cfg["losses"][0]["temperature"] == 2.0 and cfg["losses"][1]["name"] == "ce"
    assert cfg["train"]["output_dir"] == str(printed)
    assert not printed.exists(), "--print-config must not start a run"


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_a_layer_the_teacher_lacks_exits_2_naming_it(config_file, workdir):
    proc = cli("distill", str(config_file), "losses.2.layers=[[0, 9]]", f"train.output_dir={workdir / 'bad_layer'}")
    line = _one_line_error(proc)
    assert "losses[2].layers" in line and "9" in line and "0..1" in line, line


def test_a_missing_data_file_exits_2(config_file, workdir):
    missing = workdir / "no_such_dir" / "train.txt"
    proc = cli("distill", str(config_file), f"data.train={missing}", f"train.output_dir={workdir / 'bad_data'}")
    line = _one_line_error(proc)
    assert str(missing) in line and "not found" in line, line


def test_an_unknown_key_exits_2_with_a_suggestion(config_file, workdir):
    proc = cli("distill", str(config_file), "train.stpes=3", f"train.output_dir={workdir / 'bad_key'}")
    line = _one_line_error(proc)
    assert "train.stpes" in line and "did you mean 'steps'" in line, line


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_does_not_announce_the_cpu(tmp_path):
    """transformers' save_pretrained imports deepspeed wherever it is installed, and on a machine without a GPU
    DeepSpeed prints on stdout that it uses the CPU. A model saved before any run (as the demo's first stage
    converts its teacher), then a run, in one CLI process: no such line."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path

        import yaml

        from alignkd.cli import main  # what the console script imports first
        from alignkd import testing as tiny

        root = Path({str(tmp_path)!r})
        tiny.save_model(root / "teacher", "llama", layers=2)
        assert "deepspeed" in sys.modules, "nothing imported deepspeed: the test shows nothing"
        cfg = {{
            "teacher": {{"path": str(root / "teacher"), "dtype": "float32"}},
            "student": {{"from_teacher": {{"layers": [1]}}}},
            "data": {{"train": str(tiny.write_corpus(root / "corpus")), "seq_len": 16, "eval_fraction": 0.1}},
            "losses": [{{"type": "kl"}}],
            "train": {{"steps": 1, "batch_size": 2, "mixed_precision": "no", "progress": False,
                       "eval_batches": 1, "output_dir": str(root / "run")}},
        }}
        (root / "distill.yaml").write_text(yaml.safe_dump(cfg))
        sys.exit(main(["distill", str(root / "distill.yaml")]))
        """
    )
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Setting accelerator" not in res.stdout + res.stderr, res.stdout[-2000:]
