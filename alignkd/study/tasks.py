"""A study's benchmark tasks (its ``eval:`` entry): lm-eval-harness on each finished variant's student and teacher.

Each variant is scored beside the teacher it was distilled from (a variant may
change the teacher, e.g. a corrected one), through ``alignkd eval``'s own
:func:`~alignkd.evaluate.evaluate_models` with every other metric group skipped.
The result is an ``eval.json`` in ``RUN/tasks/``, which ``alignkd report --eval``
also reads. The table shows it only while its settings match the study file's.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkd.errors import UserError
from alignkd.evaluate import GROUPS, EvalSettings, evaluate_models
from alignkd.evaluate.harness import open_harness
from alignkd.evaluate.task_results import task_rows
from alignkd.study.spec import TasksSpec

QUICK_LIMIT = 8
"""Documents per task under ``--quick`` (stand-in models: a check that the tasks run, not a score)."""
FOLDER = "tasks"


def task_settings(spec: TasksSpec, quick: bool) -> EvalSettings:
    limit = min(spec.limit or QUICK_LIMIT, QUICK_LIMIT) if quick else spec.limit
    return EvalSettings(
        skip=GROUPS,
        tasks=tuple(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=limit,
        task_paths=tuple(spec.task_paths),
        dtype="float32" if quick else "auto",
    )


def check_tasks(spec: TasksSpec, assets: dict[str, Path]) -> None:
    """Stop with one line, before any run, on a task name lm-eval does not know (or lm-eval missing)."""
    if spec.tasks:
        with open_harness(list(spec.tasks), paths=list(spec.task_paths), assets=assets):
            pass


def score_variant(spec: TasksSpec, run_dir: Path, teacher: str, quick: bool, assets: dict[str, Path]) -> str | None:
    """Run the tasks on ``run_dir``'s student and ``teacher`` into ``run_dir/tasks/eval.json``; the error, if any."""
    if not spec.tasks:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        student = summary.get("student_dir") or str(run_dir / "student")
        evaluate_models(
            {"teacher": teacher, "student": student},
            task_settings(spec, quick),
            teacher="teacher",
            out=run_dir / FOLDER,
            progress=False,
            task_assets=assets,
        )
    except (UserError, OSError, ValueError) as e:
        return str(e)
    return None


def read_scores(spec: TasksSpec, run_dir: Path, quick: bool) -> dict:
    """``{label: {"teacher", "student", "kept"}}`` (texts for the table) from ``run_dir/tasks/eval.json``, when its
    settings are the study file's; else ``{}``."""
    try:
        ev = json.loads((run_dir / FOLDER / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    s, want = ev.get("settings", {}), task_settings(spec, quick)
    if [s.get("tasks"), s.get("num_fewshot"), s.get("limit")] != [list(want.tasks), want.num_fewshot, want.limit]:
        return {}  # scored under other settings: stale
    return {
        label: {"teacher": v.get("teacher", "—"), "student": v.get("student", "—"), "kept": k.get("student", "—")}
        for label, v, k in task_rows(ev)
    }
