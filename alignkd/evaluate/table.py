"""``alignkd eval``'s table: one row per metric, a column per model and, beside each, what it kept of the teacher.

Rows, labels, formats and the retention shown beside a metric all come from
:data:`~alignkd.evaluate.catalogue.METRICS`. Cells are never cut short: when
the models do not fit the console's width side by side, they wrap into
several tables, each with the metric column and as many models as fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from alignkd.evaluate.catalogue import METRICS, Metric, shown
from alignkd.evaluate.task_results import task_rows

ARROWS = {"higher": " ↑", "lower": " ↓", None: ""}
CAPTION = (
    "kept: the share of the teacher's score the model keeps (teacher/model for perplexity and CER, "
    "where lower is better; (model - chance) / (teacher - chance) for accuracy and task scores above chance); "
    "speed-up: teacher ms / model ms; parameters: model / teacher"
)


@dataclass
class _Column:
    header: str
    cells: list[str]
    style: str | None = None


def _model_columns(role: str, metrics: dict, kept: dict | None, rows: list[Metric], tasks: list) -> list[_Column]:
    """A model's value column and, when it has a retention entry, its ``kept`` column; the catalogue's rows, then the
    lm-eval tasks' (:func:`~alignkd.evaluate.task_results.task_rows`)."""
    values = [shown(metrics.get(m.key), m.fmt) for m in rows] + [v.get(role, "—") for _, v, _ in tasks]
    columns = [_Column(role, values)]
    if kept is not None or any(role in k for _, _, k in tasks):
        kept = kept or {}
        cells = ["" if m.kept is None or m.kept.key not in kept else shown(kept[m.kept.key], m.kept.fmt) for m in rows]
        columns.append(_Column(f"{role} kept", cells + [k.get(role, "") for _, _, k in tasks], "cyan"))
    return columns


def _table(labels: list[str], groups: list[list[_Column]], *, title: str | None, caption: str | None) -> Table:
    table = Table(title=title, caption=caption)
    table.add_column("metric", no_wrap=True)
    columns = [c for group in groups for c in group]
    for c in columns:
        table.add_column(c.header, justify="right", style=c.style, no_wrap=True)
    for i, label in enumerate(labels):
        table.add_row(label, *(c.cells[i] for c in columns))
    return table


def _natural_width(console: Console, table: Table) -> int:
    return Measurement.get(console, console.options.update_width(1_000_000), table).maximum


def eval_tables(result: dict, console: Console) -> list[Table]:
    """``eval.json``'s numbers as tables that fit ``console.width`` (one table when they all fit)."""
    models, kept = result["models"], result.get("retention", {})
    rows = [m for m in METRICS if any(m.key in e["metrics"] for e in models.values())]
    tasks = task_rows(result)
    labels = [m.label + ARROWS[m.better] for m in rows] + [label for label, _, _ in tasks]
    groups = [_model_columns(role, e["metrics"], kept.get(role), rows, tasks) for role, e in models.items()]
    caption = CAPTION if kept or result.get("task_retention") else None
    chunks: list[list[list[_Column]]] = [[]]
    for group in groups:
        trial = _table(labels, chunks[-1] + [group], title=None, caption=None)
        if chunks[-1] and _natural_width(console, trial) > console.width:
            chunks.append([])  # this model goes to the next table
        chunks[-1].append(group)
    last = len(chunks) - 1
    return [
        _table(labels, chunk, title="alignkd eval" if i == 0 else None, caption=caption if i == last else None)
        for i, chunk in enumerate(chunks)
    ]


def print_table(result: dict, console: Console | None = None) -> None:
    """Print :func:`eval_tables` and ``eval.json``'s warnings (to stdout unless ``console`` says otherwise)."""
    console = console or Console()
    for table in eval_tables(result, console):
        console.print(table)
    for warning in result.get("warnings", []):
        console.print(Text.assemble(("warning: ", "yellow"), warning))
