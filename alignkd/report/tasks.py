"""The report's benchmark-task section: ``alignkd eval --tasks`` scores, what the student kept, and what each task was.

The rows come from :func:`alignkd.evaluate.task_results.task_rows`, as the
printed table's do; a task's shots, version, limit, prompt and config hash are
stated under the table, since a score means nothing without them.
"""

from __future__ import annotations

from alignkd.evaluate.catalogue import number, percent
from alignkd.evaluate.task_results import task_rows
from alignkd.report.document import Block, Cell, Table
from alignkd.report.evaluation import model_order


def task_blocks(ev: dict) -> list[Block]:
    """The section's blocks; none when ``eval.json`` has no task scores."""
    tasks = ev.get("tasks")
    models = ev.get("models")
    if not (isinstance(tasks, dict) and tasks and isinstance(models, dict)):
        return []
    rows = task_rows(ev)
    columns = model_order([n for n, m in models.items() if isinstance(m, dict) and m.get("tasks")])
    scores = Table(["Task"] + columns)
    scores.rows += [[Cell(label)] + [Cell(values.get(c, "—")) for c in columns] for label, values, _ in rows]
    blocks: list[Block] = [
        ("h2", "Benchmark tasks (lm-eval-harness)"),
        (
            "p",
            "Scores ± standard error from lm-eval-harness, run on the same loaded models; the shots are part of the "
            "number (a model can score far apart zero-shot and few-shot), so every row states them. Above chance: "
            "the score minus a uniform guess over each document's choices.",
        ),
        ("table", scores),
    ]
    compared = [c for c in columns if c in (ev.get("task_retention") or {})]
    if compared:
        kept = Table(["Kept of the teacher"] + compared)
        kept.rows += [[Cell(label)] + [Cell(k.get(c, "—")) for c in compared] for label, _, k in rows]
        blocks += [
            (
                "p",
                "What each model keeps of the teacher's task score (model / teacher) and of its score above chance "
                "((model - chance) / (teacher - chance)):",
            ),
            ("table", kept),
        ]
    blocks += [("p", task_sentence(name, t)) for name, t in tasks.items() if isinstance(t, dict)]
    return blocks


def task_sentence(name: str, t: dict) -> str:
    """``alignkd_sentiment: 4-shot, version 1.0, 200 documents (limit 200), ...``: what fixes the task's numbers."""
    docs = t.get("docs")
    parts = [
        f"{t.get('shots', '?')}-shot",
        f"version {t.get('version', '?')}",
        f"{docs if docs is not None else '?'} documents" + (f" (limit {t['limit']})" if t.get("limit") else " (all)"),
        f"metric {t.get('metric', '?')}",
    ]
    if t.get("chance") is not None:
        parts.append(f"chance {percent(number(t['chance']))}")
    prompt = (t.get("template") or {}).get("doc_to_text")
    if isinstance(prompt, str):
        parts.append(f"prompt {prompt!r}")
    if isinstance(t.get("config_sha256"), str):
        parts.append(f"config sha256 {t['config_sha256'][:12]}")
    return f"{name}: " + ", ".join(parts) + "."
