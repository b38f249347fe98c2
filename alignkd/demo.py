"""The main job for a new user: distil a real LLM and show what the student kept.

Stages: fetch the packaged assets; distil SmolLM2-135M-Instruct into a student of
6 of its 30 blocks (63 % fewer parameters) with the feature-alignment recipe;
train the same student with plain cross-entropy for the same steps as a
baseline; evaluate teacher, student and baseline; write the report. Every stage
is timed into ``OUT/demo_timings.json``.

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
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MAX_STEPS = 200
DISTILL_MINUTES = 5.0
STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]


def student_layers(teacher: Path) -> list[int]:
    """The teacher blocks the student keeps: 6 of SmolLM2's 30, else a fifth spread evenly."""
    from transformers import AutoConfig

    from alignkd.student import even_layers

    n = AutoConfig.from_pretrained(teacher).num_hidden_layers
    return STUDENT_LAYERS if n == len(STUDENT_LAYERS) * 5 else even_layers(n, max(1, n // 5))


def run_config(assets, out: Path, steps: int, recipe: str, minutes: float | None = None) -> dict:
    """The distillation (``feature``) or baseline (``ce``) run of the demo, as a config dict.

    Both runs share everything but the loss terms: the student (the same 6 teacher
    blocks), data, optimizer, schedule and steps. ``minutes`` caps the training
    time (``steps`` is then the most it runs).
    """
    if recipe == "feature":
        losses = [
            {"type": "kl", "kind": "forward", "temperature": 1.0, "weight": 1.0},
            {"type": "hidden", "metric": "standardized", "layers": "auto", "weight": 1.0},
            {"type": "relation", "of": ["q", "k", "v"], "layers": "last", "weight": 1.0},
        ]
        weighting = {"strategy": "gradnorm", "alpha": 1.5, "every": 4}
    else:
        losses = [{"type": "ce"}]
        weighting = {"strategy": "static"}
    return {
        # auto: bfloat16 where it is fast (~3x float32 on CPUs with AVX512-BF16/AMX,
        # held-out perplexity within 1 %), float32 where bf16 is emulated (AVX2: ~20x slower).
        "teacher": {"path": str(assets.teacher), "dtype": "auto"},
        "student": {"from_teacher": {"layers": student_layers(assets.teacher)}},
        "data": {"train": str(assets.sotu), "eval": str(assets.moby_dick), "seq_len": 128, "max_train_tokens": 600_000},
        "losses": losses,
        "weighting": weighting,
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


def _headline(console: Console, ev: dict) -> list[tuple[str, str, str, str]]:
    models = ev["models"]
    rows = []
    for key, label, fmt in (
        ("perplexity", "Moby-Dick perplexity (lower is better)", "{:.1f}"),
        ("accuracy", "Sentiment accuracy, 4-shot", "{:.1%}"),
        ("rougeL_vs_teacher", "ROUGE-L vs teacher's continuation", "{:.3f}"),
        ("decode_ms_per_token", "Decode ms / token", "{:.2f}"),
        ("params", "Parameters (M)", None),
    ):
        cells = []
        for role in ("teacher", "student", "baseline"):
            v = models.get(role, {}).get("metrics", {}).get(key)
            if v is None:
                cells.append("-")
            elif key == "params":
                cells.append(f"{v / 1e6:.1f}")
            else:
                cells.append(fmt.format(v))
        rows.append((label, *cells))
    table = Table(title="What the student kept")
    for col in ("metric", "teacher", "distilled student", "CE baseline"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    return rows


def run(steps: int | None = None, out: str | Path = "runs/demo", minutes: float | None = None) -> dict:
    """Run every stage; returns the stage timings and headline numbers.

    ``steps``: an exact step count for both runs. Without it, the distillation
    runs at most ``MAX_STEPS`` steps within ``minutes`` (default ``DISTILL_MINUTES``).
    """
    from alignkd.assets import prepare
    from alignkd.config import load_config
    from alignkd.evaluate import EvalSettings, evaluate_models
    from alignkd.report import write_report
    from alignkd.engine.run import distill

    console = Console(stderr=True)
    steps = steps or (int(os.environ["DEMO_STEPS"]) if os.environ.get("DEMO_STEPS") else None)
    if steps is None:
        steps, minutes = MAX_STEPS, minutes or DISTILL_MINUTES
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str, title: str):
        console.rule(f"[bold]{title}")
        return name, time.perf_counter()

    def done(mark) -> None:
        name, t0 = mark
        timings[name] = round(time.perf_counter() - t0, 1)
        console.print(f"[green]{name}: {timings[name]:.0f} s")

    mark = stage("assets", "1/5 assets: SmolLM2-135M-Instruct, State of the Union, Moby-Dick, sentiment")
    assets = prepare(progress=True)
    done(mark)

    budget = f"up to {steps} steps or {minutes:g} minutes" if minutes else f"{steps} steps"
    mark = stage("distill", f"2/5 distil: KL + hidden states + q/k/v relations, GradNorm weights, {budget}")
    summary = distill(load_config(data=run_config(assets, out / "distilled", steps, "feature", minutes)))
    steps = summary["steps"]  # the baseline gets as many steps as the distillation had
    done(mark)

    mark = stage("baseline", f"3/5 baseline: the same student, cross-entropy only, {steps} steps")
    distill(load_config(data=run_config(assets, out / "baseline", steps, "ce")))
    done(mark)

    mark = stage("eval", "4/5 evaluate teacher, distilled student and baseline")
    settings = EvalSettings(text=str(assets.moby_dick), labelled=str(assets.sentiment / "test.csv"), ppl_tokens=8192, examples=100, prompts=8)
    ev = evaluate_models(
        {"teacher": str(assets.teacher), "student": str(out / "distilled" / "student"), "baseline": str(out / "baseline" / "student")},
        settings,
        teacher="teacher",
        out=out / "distilled",
    )
    done(mark)

    mark = stage("report", "5/5 report")
    paths = write_report(out / "distilled", baselines={"ce-baseline": out / "baseline"})
    done(mark)

    timings["total"] = round(sum(timings.values()), 1)
    rows = _headline(console, ev)
    result = {"steps": steps, "timings_s": timings, "headline": rows, "report": str(paths["html"])}
    (out / "demo_timings.json").write_text(json.dumps(result, indent=2))
    console.print(f"stage seconds: {json.dumps(timings)}")
    print(f"report: {paths['html']}")
    return result


def cli_main(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's own stage display is enough
    run(steps=args.steps, out=args.out, minutes=args.minutes)
    return 0
