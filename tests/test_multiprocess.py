"""Two processes launched as docs/scaling-out.md says (``accelerate launch``, gloo on CPU) against one process.

The global batch of 2 processes x 2 blocks is the first 4 entries of the same
permutation a single process with batch 4 takes, so every step's logged
(token-weighted, all-reduced) losses and the saved student must match the
single-process run. Launched twice: with the teacher whole on each process, and
with its blocks sharded over the two (FSDP2), which the capture hooks and the
fused LM-head terms then read. Launched with the FSDP config, the student's
blocks are sharded too, and must give the same run, resume exactly from their
per-process checkpoints, and survive GradNorm's extra backwards; the same under
DeepSpeed ZeRO-1, 2 and 3 (where deepspeed is installed), with the teacher
partitioned by ZeRO-3 inference. A NaN term on one
process of a sharded launch skips the step on every process; ``select: search``
probes its candidates under the launch as one process does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkd.backend import make_accelerator
from alignkd.engine.judge import JUDGE_KEYS
from alignkd.errors import ConfigError
from alignkd.testing import save_model, write_corpus

ROOT = Path(__file__).resolve().parents[1]
DDP = ROOT / "configs" / "accelerate" / "ddp.yaml"
FSDP = ROOT / "configs" / "accelerate" / "fsdp.yaml"
DEEPSPEED = ROOT / "configs" / "accelerate" / "deepspeed.yaml"
TERMS = ("loss/kl", "loss/ce", "loss/hidden", "loss/relation")
STEPS = 3

needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
try:
    import deepspeed  # noqa: F401

    HAS_DEEPSPEED = True
except ImportError:
    HAS_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install -e .[test] installs it)"
)


def _cfg(
    root: Path,
    out: str,
    batch: int,
    placement: str = "replicate",
    generation: dict | None = None,
    student: dict | None = None,
    **train,
) -> Path:
    cfg = {
        "teacher": {
            "path": str(root / "teacher"),
            "dtype": "float32",
            "placement": placement,
        },  # float32: shape-independent maths
        "student": {
            "config": {"num_hidden_layers": 1, "hidden_size": 48, "intermediate_size": 96}
        },  # widths differ: projectors
        "data": {"train": str(root / "data"), "seq_len": 16},
        # kl + ce under mixed_precision "no" run fused from the LM heads; hidden and relation read the capture hooks.
        "losses": [{"type": "kl"}, {"type": "ce"}, {"type": "hidden"}, {"type": "relation"}],
        # Learned weights, trained by the main optimizer. (GradNorm is left out: its norms are per-process
        # gradients', so two processes differ from one by ~1e-4 by design.)
        "weighting": {"strategy": "uncertainty"},
        "train": {
            "steps": STEPS,
            "batch_size": batch,
            "warmup": 1,
            "eval_every": 0,
            "mixed_precision": "no",
            "progress": False,
            "eval_batches": 1000,  # every held-out block, whatever the batch size
            "output_dir": str(root / out),
            **train,
        },
    }
    if generation is not None:
        cfg["generation"] = generation
    if student is not None:
        cfg["student"] = student
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    # PYTHONFAULTHANDLER: a process that aborts prints every thread's Python stack, saying where it was.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONFAULTHANDLER": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert out.returncode == 0, f"stdout: {out.stdout[-1000:]}\nstderr: {out.stderr[-4000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(config: Path, root: Path, launch: Path = DDP, *extra: str) -> subprocess.CompletedProcess:
    """The launch command of docs/scaling-out.md, with two processes."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return _run(
        accelerate
        + [
            "--config_file",
            str(launch),
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "alignkd",
            "distill",
            str(config),
            *extra,
        ],
        root,
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, batch 4."""
    root = tmp_path_factory.mktemp("mp")
    save_model(root / "teacher", "llama", layers=2, width=32)
    write_corpus(root / "data")
    _run([sys.executable, "-m", "alignkd", "distill", str(_cfg(root, "one", 4))], root)
    return root


def _check_matches_one_process(root: Path, two: Path, launch: subprocess.CompletedProcess) -> None:
    one = root / "one"
    a, b = _records(two), _records(one)
    # One copy of each output: the main process alone writes the log, the student and the summary.
    assert [r["split"] for r in a] == [r["split"] for r in b] and sum(r["split"] == "train" for r in a) == STEPS
    assert launch.stdout.count("student saved to") == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for x, y in zip(a, b, strict=True):
        keys = [k for k in y if k.startswith(("loss", "w/", "eval_"))]
        assert len(keys) >= (2 * len(TERMS) + 1 if x["split"] == "train" else 1)
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    s2 = load_file(str(two / "student" / "model.safetensors"))
    s1 = load_file(str(one / "student" / "model.safetensors"))
    assert s2.keys() == s1.keys()
    for k in s2:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-4, rtol=0, msg=k)
    # Projectors are trained (the widths differ) and saved, equal too; so are the checkpointed learned weights.
    p2, p1 = load_file(str(two / "projectors.safetensors")), load_file(str(one / "projectors.safetensors"))
    assert p2.keys() == p1.keys() and p2
    for k in p2:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-4, rtol=0, msg=k)
    last = Path("checkpoints") / f"step-{STEPS}" / "state.pt"
    w2, w1 = (torch.load(d / last, weights_only=True)["weighting"] for d in (two, one))
    assert w2.keys() == w1.keys() and w2
    for k in w2:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0, msg=k)


def _check_resumes_last_step(root: Path, config: Path, launch: Path, out: Path) -> None:
    """Delete the last checkpoint and resume from the one before: the last step must be the uninterrupted run's."""
    first = _records(out)
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")
    _launch_two(config, root, launch, "--resume")
    again = [r for r in _records(out) if r["split"] == "train" and r["step"] == STEPS]
    want = [r for r in first if r["split"] == "train" and r["step"] == STEPS]
    assert len(again) == 2 and len(want) == 1
    keys = [k for k in want[0] if k.startswith(("loss", "w/"))]
    assert keys
    for key in keys:
        assert again[-1][key] == pytest.approx(want[0][key], rel=1e-6, abs=1e-7), key


@needs_distributed
@pytest.mark.slow
def test_two_processes_launched_as_documented_match_one_process(one_process):
    launch = _launch_two(_cfg(one_process, "two", 2), one_process)
    _check_matches_one_process(one_process, one_process / "two", launch)


@needs_distributed
@pytest.mark.slow
def test_a_lora_student_over_two_ddp_processes_matches_one_process(one_process):
    """Only the adapters train and DDP averages their gradients: the two runs' losses and merged students agree."""
    student = {"from_teacher": {"layers": [0, 1]}, "peft": {"r": 4, "target_modules": ["all-linear", "lm_head"]}}
    for out, batch in (("lora_one", 4), ("lora_two", 2)):
        config = _cfg(one_process, out, batch, student=student)
        if batch == 4:
            _run([sys.executable, "-m", "alignkd", "distill", str(config)], one_process)
        else:
            launch = _launch_two(config, one_process)
    assert launch.stdout.count("student saved to") == 1
    a, b = _records(one_process / "lora_two"), _records(one_process / "lora_one")
    assert [r["split"] for r in a] == [r["split"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in [k for k in y if k.startswith(("loss", "eval_"))]:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    s2, s1 = (load_file(str(one_process / d / "student" / "model.safetensors")) for d in ("lora_two", "lora_one"))
    assert s2.keys() == s1.keys() and not any("lora" in k for k in s2)
    for k in s2:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-4, rtol=0, msg=k)


# Seed 0 draws the data for step 1 and the student's samples for steps 2 and 3.
ON_POLICY = {"sources": {"dataset": 0.5, "student": 0.5}, "prompt_tokens": 4, "max_new_tokens": 8, "eval_prompts": 4}


@needs_distributed
@pytest.mark.slow
@pytest.mark.parametrize("placement", ["replicate", "shard", "fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_an_on_policy_run_over_two_processes_matches_one_process(one_process, placement):
    """Each process samples its share (row seeds follow the global row). A sharded teacher (shard), a student
    sharded by an FSDP launch (fsdp), or a student partitioned by ZeRO-3 with the teacher under ZeRO-3 inference
    (zero3) keeps every process stepping until all its rows are done; the generation metrics of the last
    evaluation come out as one process's."""
    one = one_process / "one_on_policy"
    if not one.exists():
        _run(
            [sys.executable, "-m", "alignkd", "distill", str(_cfg(one_process, one.name, 4, generation=ON_POLICY))],
            one_process,
        )
    out = f"two_on_policy_{placement}"
    teacher = "shard" if placement in ("shard", "zero3") else "replicate"
    launch_file = {"fsdp": lambda: FSDP, "zero3": lambda: _zero3_launch(one_process)}.get(placement, lambda: DDP)()
    launch = _launch_two(_cfg(one_process, out, 2, teacher, generation=ON_POLICY), one_process, launch_file)
    a, b = _records(one_process / out), _records(one)
    train = [r for r in b if r["split"] == "train"]
    assert [r["sources"] for r in train] == ["dataset", "student", "student"]
    for x, y in zip(a, b, strict=True):
        if x["split"] == "train":
            assert x["generated_tokens"] == y["generated_tokens"] and x["sources"] == y["sources"]
        for key in [k for k in y if k.startswith(("loss", "eval_")) or k in JUDGE_KEYS]:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert "gen_teacher_nll" in b[-1]
    assert launch.stdout.count("student saved to") == 1


@needs_distributed
@pytest.mark.slow
def test_a_teacher_sharded_over_two_processes_matches_a_whole_one(one_process):
    launch = _launch_two(_cfg(one_process, "sharded", 2, placement="shard"), one_process)
    # The teacher really is split: each process holds part of its parameters (blocks halved, the rest whole).
    said = re.search(
        r"teacher: blocks sharded over 2 processes with FSDP2 \(([\d.]+)M of ([\d.]+)M", " ".join(launch.stderr.split())
    )
    assert said, launch.stderr[-2000:]
    assert float(said[1]) < float(said[2])
    _check_matches_one_process(one_process, one_process / "sharded", launch)


@needs_distributed
@pytest.mark.slow
def test_a_student_sharded_by_an_fsdp_launch_matches_one_process_and_resumes(one_process):
    config = _cfg(one_process, "fsdp", 2, placement="shard", save_every=1, keep_checkpoints=3)
    launch = _launch_two(config, one_process, FSDP)
    said = re.search(
        r"student: blocks sharded over 2 processes with FSDP2 \(([\d.]+)M of ([\d.]+)M", " ".join(launch.stderr.split())
    )
    assert said, launch.stderr[-2000:]
    assert float(said[1]) < float(said[2])
    out = one_process / "fsdp"
    _check_matches_one_process(one_process, out, launch)
    ckpt = out / "checkpoints" / f"step-{STEPS}"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [
            "optimizer-rank0.pt",
            "optimizer-rank1.pt",
            "side-rank0.safetensors",
            "side-rank1.safetensors",
            "state.json",
            "state.pt",
        ]
    )
    # Resumed from the sharded checkpoint of step 2 (each process reloads its own shards and
    # AdamW moments), the last step is the uninterrupted run's.
    _check_resumes_last_step(one_process, config, FSDP, out)


@needs_distributed
@pytest.mark.slow
def test_gradnorm_on_a_sharded_student_equals_gradnorm_under_ddp(one_process):
    """GradNorm backpropagates once per term before the step's backward: the sharded blocks must stay gathered
    through those, and ZeRO's gradient hooks must not take those gradients for the step's."""
    runs = {}
    for name, launch in (("gn-ddp", DDP), ("gn-fsdp", FSDP)) + ((("gn-zero2", DEEPSPEED),) if HAS_DEEPSPEED else ()):
        config = _cfg(one_process, name, 2)
        cfg = yaml.safe_load(config.read_text())
        cfg["weighting"] = {"strategy": "gradnorm"}
        config.write_text(yaml.safe_dump(cfg))
        _launch_two(config, one_process, launch)
        runs[name] = _records(one_process / name)
    for name in runs.keys() - {"gn-ddp"}:  # FSDP, and ZeRO-2 where deepspeed is installed (ZeRO-3 refuses GradNorm)
        assert len(runs[name]) == len(runs["gn-ddp"]) > STEPS
        for x, y in zip(runs[name], runs["gn-ddp"], strict=True):
            keys = [k for k in y if k.startswith(("loss", "w/", "eval_"))]
            assert any(k.startswith("w/") for k in keys) or x["split"] == "eval"
            for key in keys:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (name, x["step"], key)


def _zero3_launch(root: Path) -> Path:
    """An Accelerate config for ZeRO-3 through a deepspeed_config_file; every matrix of the tiny student partitioned.

    The norms (48 weights) stay persistent, as DeepSpeed keeps small tensors: whole on every process,
    re-gathered after each step and after a resume.
    """
    ds = root / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 64}}))
    launch = yaml.safe_load(DEEPSPEED.read_text())
    launch["deepspeed_config"] = {"deepspeed_config_file": str(ds), "zero3_init_flag": False}
    path = root / "zero3-launch.yaml"
    path.write_text(yaml.safe_dump(launch))
    return path


def _zero1_launch(root: Path) -> Path:
    launch = yaml.safe_load(DEEPSPEED.read_text())
    launch["deepspeed_config"]["zero_stage"] = 1
    path = root / "zero1-launch.yaml"
    path.write_text(yaml.safe_dump(launch))
    return path


@needs_distributed
@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_student_under_deepspeed_zero_matches_one_process_and_resumes(one_process, stage):
    """ZeRO-1 partitions the AdamW state, ZeRO-2 the gradients too, ZeRO-3 the weights too; the run, the
    saved student and projectors and the resume must be one process's."""
    name = f"zero{stage}"
    config = _cfg(one_process, name, 2, placement="shard", save_every=1, keep_checkpoints=3)
    launch_file = {1: _zero1_launch, 2: lambda root: DEEPSPEED, 3: _zero3_launch}[stage](one_process)
    launch = _launch_two(config, one_process, launch_file)
    said = re.search(
        rf"student: DeepSpeed ZeRO-{stage} over 2 processes, .* \(([\d.]+)M of ([\d.]+)M weights here",
        " ".join(launch.stderr.split()),
    )
    assert said, launch.stderr[-2000:]
    assert (float(said[1]) < float(said[2])) == (stage == 3)
    # kl and ce run fused from the heads under every stage; ZeRO-3 keeps the student's head whole for them.
    assert ("whole on each, for the fused LM-head terms" in " ".join(launch.stderr.split())) == (stage == 3)
    # The teacher (placement: shard) is partitioned by ZeRO-3 inference whatever the student's stage, its head whole.
    said = re.search(
        r"teacher: weights partitioned over 2 processes with DeepSpeed ZeRO-3 inference "
        r"\(([\d.]+)M of ([\d.]+)M parameters here, the head whole on each\)",
        " ".join(launch.stderr.split()),
    )
    assert said and float(said[1]) < float(said[2]), launch.stderr[-2000:]
    out = one_process / name
    _check_matches_one_process(one_process, out, launch)
    ckpt = out / "checkpoints" / f"step-{STEPS}"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["optimizer-rank0.pt", "optimizer-rank1.pt", "side.safetensors", "state.json", "state.pt"]
    )
    # Each process holds part of the float32 master weights (ZeRO's flat partitions, padded).
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    parts = [torch.load(ckpt / f"optimizer-rank{r}.pt", weights_only=True)[key] for r in (0, 1)]
    total = sum(p.numel() for p in load_file(str(ckpt / "side.safetensors")).values())
    assert 0 < sum(t.numel() for t in parts[0]) < total
    _check_resumes_last_step(one_process, config, launch_file, out)


POISON = """
import sys

import torch.distributed as dist

import alignkd.engine.step as step
from alignkd.cli import main

real, calls = step.term_losses, {"n": 0}


def poisoned(*args, **kwargs):
    calls["n"] += 1
    losses = real(*args, **kwargs)
    if calls["n"] == 2 and dist.get_rank() == 1:  # step 2, on one process only
        losses["hidden"] = losses["hidden"] * float("nan")
    return losses


step.term_losses = poisoned
sys.exit(main())
"""


@needs_distributed
@pytest.mark.slow
@pytest.mark.parametrize("launch", ["fsdp", "zero2", "zero3"])
def test_a_nan_on_one_process_skips_the_step_on_all(one_process, launch):
    """A NaN term on one process of a sharded launch: every process skips the step (FSDP's optimizer, or
    ZeRO's), names the term, and the student leaves the step as it entered it."""
    if launch != "fsdp" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e .[test] installs it)")
    name = f"nan-{launch}"
    config = _cfg(one_process, name, 2, steps=2, save_every=1, keep_checkpoints=3, min_lr_ratio=1.0)
    script = one_process / "poisoned.py"
    script.write_text(POISON)
    launch_file = {"fsdp": FSDP, "zero2": DEEPSPEED}.get(launch) or _zero3_launch(one_process)
    _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(launch_file),
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            str(script),
            "distill",
            str(config),
        ],
        one_process,
    )
    out = one_process / name
    train = [r for r in _records(out) if r["split"] == "train"]
    assert [r.get("bad") for r in train] == [None, "hidden"] and train[1]["skipped"] == 1
    after_one = load_file(str(out / "checkpoints" / "step-1" / "side.safetensors")) if launch != "fsdp" else None
    final = load_file(str(out / "student" / "model.safetensors"))
    if after_one is None:  # FSDP checkpoints hold shards: compare with the step-1 student, saved whole by a 1-step run
        config_one = _cfg(one_process, name + "-1", 2, steps=1, min_lr_ratio=1.0)
        _launch_two(config_one, one_process, FSDP)
        after_one = {
            f"student.{k}": v
            for k, v in load_file(str(one_process / (name + "-1") / "student" / "model.safetensors")).items()
        }
    assert final and all(torch.equal(final[k], after_one[f"student.{k}"]) for k in final)


def _search_cfg(root: Path, out: str, batch: int) -> Path:
    """Blocks chosen by ``select: search``.

    Each candidate is probed by two steps of the run's own set-up, under the launch.
    """
    cfg = yaml.safe_load(_cfg(root, out, batch, placement="shard", steps=2).read_text())
    cfg["teacher"]["path"] = str(root / "teacher4")
    cfg["student"] = {
        "from_teacher": {"num_layers": 2, "select": "search", "search_candidates": 3, "search_probe_steps": 2}
    }
    cfg["losses"] = [{"type": "kl"}, {"type": "hidden"}]
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_distributed
@pytest.mark.slow
@pytest.mark.parametrize("launch", ["fsdp", "zero3"])
def test_select_search_under_a_sharded_launch_probes_as_one_process_does(one_process, launch):
    if launch != "fsdp" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e .[test] installs it)")
    if not (one_process / "search-one").exists():
        save_model(one_process / "teacher4", "llama", layers=4, width=32)
        _run([sys.executable, "-m", "alignkd", "distill", str(_search_cfg(one_process, "search-one", 4))], one_process)
    name = f"search-{launch}"
    _launch_two(
        _search_cfg(one_process, name, 2), one_process, FSDP if launch == "fsdp" else _zero3_launch(one_process)
    )
    got, want = (
        json.loads((one_process / n / "block_scores.json").read_text())["candidates"] for n in (name, "search-one")
    )
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g["layers"] == w["layers"] and g["probe_loss"] == pytest.approx(w["probe_loss"], rel=1e-5), g
    a, b = _records(one_process / name), _records(one_process / "search-one")
    assert [r["split"] for r in a] == [r["split"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in (k for k in y if k.startswith(("loss", "eval_"))):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)


@pytest.mark.parametrize(
    "env",
    [
        {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"},
        {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"},
        {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "/nonexistent/ds.json"},
    ],
)
def test_deepspeed_launches_alignkd_cannot_run_are_refused_in_one_line(env, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        make_accelerator("no")
    assert "\n" not in str(info.value) and str(info.value).startswith("accelerate launch: ")


def test_a_deepspeed_config_file_gives_the_stage(tmp_path, monkeypatch):
    from alignkd.backend.zero import launch_stage

    path = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert launch_stage() == 1
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offload"):
        launch_stage()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert launch_stage() is None


@needs_deepspeed
def test_fp16_autocast_under_deepspeed_is_refused_in_one_line():
    from types import SimpleNamespace

    from alignkd.backend import zero

    cfg = SimpleNamespace(train=SimpleNamespace(mixed_precision="fp16", batch_size=2, grad_accum=1, max_grad_norm=1.0))
    with pytest.raises(ConfigError) as info:
        zero.wrap(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), {"stage": 2}, cfg, 1)
    assert "\n" not in str(info.value) and "fp16" in str(info.value)


@needs_deepspeed
def test_gradnorm_under_zero3_is_refused_in_one_line():
    from types import SimpleNamespace

    from alignkd.backend import zero

    cfg = SimpleNamespace(
        train=SimpleNamespace(mixed_precision="no", batch_size=2, grad_accum=1, max_grad_norm=1.0),
        weighting=SimpleNamespace(strategy="gradnorm"),
    )
    with pytest.raises(ConfigError) as info:
        zero.wrap(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), {"stage": 3}, cfg, 1)
    assert "\n" not in str(info.value) and "gradnorm" in str(info.value)


def test_a_deepspeed_launch_without_deepspeed_says_to_install_it(monkeypatch):
    """Both places that start a DeepSpeed engine (the student's ZeRO, the teacher's ZeRO-3 inference) say what to do."""
    from types import SimpleNamespace

    from alignkd.backend import zero

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now raises ImportError
    cfg = SimpleNamespace(train=SimpleNamespace(mixed_precision="no"), weighting=SimpleNamespace(strategy="static"))
    for start in (
        lambda: zero.wrap(
            torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), {"stage": 2}, cfg, 2
        ),
        lambda: zero.shard_teacher(torch.nn.Linear(2, 2), {"stage": 2}, 2),
    ):
        with pytest.raises(ConfigError) as info:
            start()
        assert "\n" not in str(info.value) and "pip install deepspeed" in str(info.value)
