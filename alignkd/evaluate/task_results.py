"""Benchmark-task scores in ``eval.json``: what each model kept of the teacher's, and the rows tables show.

``eval.json`` holds, for ``alignkd eval --tasks``:

- ``tasks[name]``: what fixes the meaning of the task's numbers, the same for every
  model: ``shots`` (the few-shot examples lm-eval used), ``version``, ``limit`` and
  ``docs`` (documents scored), ``metric`` and ``higher_is_better``, ``chance`` (a
  uniform guess over each document's choices; None unless multiple choice),
  ``template`` (the prompt fields of the task's config) and ``config_sha256``;
- ``models[role].tasks[name]``: ``value``, ``stderr``, ``shots`` and every metric lm-eval reported;
- ``task_retention[role][name]``: ``kept`` (model/teacher; teacher/model where lower is
  better) and ``kept_above_chance``, (model - chance) / (teacher - chance).

The printed table, the report and the study read them through :func:`task_rows`
and :func:`task_retention`, so the arithmetic lives here once.
"""

from __future__ import annotations

import math

from alignkd.evaluate.catalogue import general, number, percent, points

SHARED = ("metric", "higher_is_better", "shots", "version", "limit", "docs", "chance", "template", "config_sha256")
"""The fields of a task record that describe the task, not the model (``eval.json``'s ``tasks``)."""
SCORE = ("value", "stderr", "shots", "metrics")
"""The fields kept per model (``models[role].tasks``); ``shots`` too, so a mismatch would show."""


def split_records(per_model: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """``{role: {task: record}}`` from :func:`alignkd.evaluate.harness.records` -> (``tasks``, ``{role: scores}``).

    The shared fields come from the first model that ran the task (the teacher when there is one).
    """
    shared: dict = {}
    scores: dict[str, dict] = {}
    for role, records in per_model.items():
        scores[role] = {}
        for name, rec in records.items():
            shared.setdefault(name, {k: rec.get(k) for k in SHARED})
            scores[role][name] = {k: rec.get(k) for k in SCORE}
    return shared, scores


def kept(value, teacher, chance, higher_is_better: bool) -> dict:
    """``{"kept", "kept_above_chance"}`` of one score against the teacher's; None where the ratio means nothing.

    ``kept`` is model/teacher (teacher/model when lower is better); ``kept_above_chance``
    is (model - chance) / (teacher - chance), only for a higher-is-better score with a
    chance level, and only when the teacher is above chance.
    """
    m, t, c = number(value), number(teacher), number(chance)
    num, den = (m, t) if higher_is_better else (t, m)
    out = {"kept": num / den if math.isfinite(num) and math.isfinite(den) and den > 0 else None}
    ok = higher_is_better and all(math.isfinite(x) for x in (m, t, c)) and t > c
    out["kept_above_chance"] = (m - c) / (t - c) if ok else None
    return out


def task_retention(tasks: dict, teacher_scores: dict, scores: dict) -> dict:
    """``{task: kept(...)}`` of one model's ``scores`` against the teacher's, for the tasks both ran."""
    return {
        name: kept(
            scores[name]["value"],
            teacher_scores[name]["value"],
            tasks.get(name, {}).get("chance"),
            tasks.get(name, {}).get("higher_is_better", True) is not False,
        )
        for name in scores
        if name in teacher_scores
    }


def near_chance_tasks(tasks: dict, teacher_scores: dict) -> list[str]:
    """A warning per task where the teacher is less than two standard errors above chance."""
    out = []
    for name, s in teacher_scores.items():
        c, v, se = (number(x) for x in (tasks.get(name, {}).get("chance"), s.get("value"), s.get("stderr")))
        if math.isfinite(c) and math.isfinite(v) and v - c < 2 * (se if math.isfinite(se) else 0.0):
            out.append(
                f"the teacher's {name} score ({percent(v)}) is within two standard errors of chance ({percent(c)}), "
                "so the share of it a model keeps says little; use more documents (--limit) or a task it does well"
            )
    return out


def fmt_value(v, higher_is_better=True) -> str:
    """A score as a percentage when it is a share (higher is better, in [0, 1]), else in general format."""
    x = number(v)
    if not math.isfinite(x):
        return "—" if v is None else "nan"
    return percent(x) if higher_is_better is not False and 0 <= x <= 1 else general(x)


def score_text(score: dict | None, higher_is_better=True) -> str:
    """``61.2% ± 3.1`` (the stderr in the value's unit); "—" when the model did not run the task."""
    if not score:
        return "—"
    text = fmt_value(score.get("value"), higher_is_better)
    se = number(score.get("stderr"))
    if math.isfinite(se) and text.endswith("%"):
        return f"{text} ± {100 * se:.1f}"
    return f"{text} ± {se:.3g}" if math.isfinite(se) else text


def task_label(name: str, task: dict) -> str:
    """``alignkd_sentiment acc (4-shot)``: the shots are part of what the number means."""
    shots = task.get("shots")
    return f"{name} {task.get('metric', '')} ({shots if shots is not None else '?'}-shot)"


def task_rows(result: dict) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """``(label, {role: value}, {role: kept})`` per row: each task's score, and its score above chance where it has
    a chance level (the kept column then holds the retention above chance)."""
    tasks = result.get("tasks") or {}
    models = result.get("models") or {}
    ret = result.get("task_retention") or {}
    rows = []
    for name, task in tasks.items():
        hib = task.get("higher_is_better", True)
        scores = {r: (e.get("tasks") or {}).get(name) for r, e in models.items()}
        kept_of = {r: (ret.get(r) or {}).get(name) or {} for r in models}
        rows.append(
            (
                task_label(name, task),
                {r: score_text(s, hib) for r, s in scores.items()},
                {r: _share(k.get("kept")) for r, k in kept_of.items() if r in ret},
            )
        )
        if task.get("chance") is not None:
            rows.append(
                (
                    f"{name} above chance ({percent(number(task['chance']))})",
                    {r: points(number(s["value"]) - number(task["chance"])) if s else "—" for r, s in scores.items()},
                    {r: _share(k.get("kept_above_chance")) for r, k in kept_of.items() if r in ret},
                )
            )
    return rows


def _share(v) -> str:
    return "—" if v is None or not math.isfinite(number(v)) else percent(number(v))
