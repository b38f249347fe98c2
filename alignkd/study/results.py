"""A study's results, read from what its runs wrote: metrics.jsonl, summary.json and the study's marker.

One :class:`Row` per variant. The held-out metric is the runs' own evaluation
(``train.eval_every``, on the eval split, the same blocks for every variant);
its curve is taken against ``train_s``, the training seconds the loop logs with
each evaluation (the clock the minutes budget counts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from alignkd.engine.judge import JUDGE_KEYS
from alignkd.errors import ReportError
from alignkd.evaluate.catalogue import BY_KEY, number
from alignkd.report.runlog import read_run
from alignkd.study.marker import fingerprint, read_marker
from alignkd.study.spec import Study
from alignkd.study.tasks import read_scores

METRICS = {"eval_ppl": "perplexity", "eval_accuracy": "accuracy", "eval_bpb": "bits_per_byte"}
"""The runs' held-out keys -> the catalogue metric that labels, formats and orders them."""


@dataclass
class Row:
    name: str
    """The variant."""
    about: str
    """Its one line from the study file."""
    status: str
    """done, failed or not run (no finished run made from the variant's current entry)."""
    error: str | None = None
    """Why it failed."""
    steps: int | None = None
    """Optimizer steps done."""
    train_s: float | None = None
    """Training seconds at the last evaluation (evaluations before it included)."""
    wall_s: float | None = None
    """The whole run: set-up, block selection and saving too."""
    value: float = math.nan
    """The held-out metric at the end."""
    params: int | None = None
    """The student's parameters."""
    teacher: float = math.nan
    """The teacher's held-out metric on the same blocks."""
    curve: list[dict] = field(default_factory=list)
    """``{"step", "train_s", "value"}`` per evaluation."""
    generation: dict = field(default_factory=dict)
    """The generation metrics of the last evaluation (``generation.eval_prompts``), by key; empty without them."""
    tasks: dict = field(default_factory=dict)
    """The study's lm-eval tasks (``eval:``), by row label: the student's and teacher's scores and what the student
    kept, as the table shows them (:func:`alignkd.study.tasks.read_scores`); empty without them."""


def metric_of(study: Study) -> str:
    """``eval_accuracy`` for a classification study; ``eval_bpb`` where the student has a tokenizer of its own (the
    perplexities of two tokenizers do not compare); else ``eval_ppl`` (what the runs log for the teacher's task)."""
    task = (study.spec.base.get("teacher") or {}).get("task", "causal_lm")
    student = study.spec.base.get("student") or {}
    if task == "sequence_classification":
        return "eval_accuracy"
    return "eval_bpb" if student.get("tokenizer") or student.get("new_tokenizer") else "eval_ppl"


def collect(study: Study, out: Path, quick: bool) -> list[Row]:
    key = metric_of(study)
    return [_row(study, name, out / name, key, quick) for name in study.names]


def _row(study: Study, name: str, run_dir: Path, key: str, quick: bool) -> Row:
    v = study.variant(name)
    marker = read_marker(run_dir)
    if marker is None or marker.get("fingerprint") != fingerprint(study, name, quick):
        return Row(name, v.about, "not run")
    if marker.get("error"):
        return Row(name, v.about, "failed", error=marker["error"], wall_s=marker.get("wall_s"))
    try:
        log = read_run(run_dir, name)
        summary = json.loads((run_dir / "summary.json").read_text())
    except (ReportError, OSError, ValueError) as e:
        return Row(name, v.about, "failed", error=f"unreadable run folder ({e})", wall_s=marker.get("wall_s"))
    curve = [
        {"step": r["step"], "train_s": number(r.get("train_s")), "value": number(r.get(key))}
        for r in log.eval
        if key in r
    ]
    last = curve[-1] if curve else {}
    return Row(
        name,
        v.about,
        "done",
        steps=summary.get("steps"),
        train_s=last.get("train_s"),
        wall_s=marker.get("wall_s"),
        value=number(last.get("value")),
        params=summary.get("student_params"),
        teacher=number((summary.get("teacher_eval") or {}).get(key)),
        curve=curve,
        generation={k: number(log.eval[-1][k]) for k in JUDGE_KEYS if log.eval and k in log.eval[-1]},
        tasks=read_scores(study.spec.eval, run_dir, quick),
    )


def change(value: float, ref: float, key: str) -> float:
    """Relative change for perplexity and bits per byte (0.1 = 10 % higher), difference for accuracy; NaN when either
    is missing."""
    if not (math.isfinite(value) and math.isfinite(ref)):
        return math.nan
    return value - ref if key == "eval_accuracy" else value / ref - 1


def best(rows: list[Row], key: str) -> Row | None:
    done = [r for r in rows if math.isfinite(r.value)]
    if not done:
        return None
    higher = BY_KEY[METRICS[key]].better == "higher"
    return max(done, key=lambda r: r.value) if higher else min(done, key=lambda r: r.value)
