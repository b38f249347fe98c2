"""study.json, study.md and study.html: one table row per variant and the held-out metric against training time.

Built once as the report's blocks (:mod:`alignkd.report.document`) and rendered
by the report's renderers: study.html is self-contained (the plot as a base64
PNG), study.md links ``study_files/curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from alignkd.engine.judge import JUDGE_KEYS
from alignkd.evaluate.catalogue import BY_KEY, points, shown
from alignkd.report.document import Block, Cell, Plot, Table
from alignkd.report.plots import PALETTE, STYLE, log_if_wide, new_figure, png
from alignkd.report.render import to_html, to_markdown
from alignkd.study.results import METRICS, Row, best, change, collect, metric_of
from alignkd.study.spec import Study


def write_study(study: Study, out: Path, quick: bool) -> dict:
    """Read every variant's run under ``out`` and write the three files; returns what study.json holds."""
    key = metric_of(study)
    rows = collect(study, out, quick)
    ref = next(r for r in rows if r.name == study.reference)
    result = {
        "title": study.title,
        "study_file": str(study.path),
        "quick": quick,
        "budget": {k: v for k, v in vars(study.spec.budget).items() if v is not None}
        if not quick
        else {"steps": study.spec.quick.steps},
        "metric": key,
        "better": BY_KEY[METRICS[key]].better,
        "reference": ref.name,
        "variants": [{**dataclasses.asdict(r), "change_vs_reference": change(r.value, ref.value, key)} for r in rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(result, indent=2))
    plot = _curves(rows, key, ref)
    blocks = _blocks(study, out, quick, rows, key, ref, plot)
    files = {}
    if plot is not None:
        (out / "study_files").mkdir(exist_ok=True)
        (out / "study_files" / "curves.png").write_bytes(plot.png)
        files[plot.name] = "study_files/curves.png"
    (out / "study.html").write_text(to_html(blocks, f"alignkd study: {study.title}"), encoding="utf-8")
    (out / "study.md").write_text(to_markdown(blocks, files), encoding="utf-8")
    return result


def budget_text(study: Study, quick: bool) -> str:
    if quick:
        return (
            f"{study.spec.quick.steps} steps each on tiny stand-in models "
            "(--quick: a check that the study runs, not a result)"
        )
    b = study.spec.budget
    return (
        f"{b.minutes:g} training minutes each (a faster recipe gets more steps)"
        if b.minutes is not None
        else f"{b.steps} optimizer steps each"
    )


def _blocks(
    study: Study, out: Path, quick: bool, rows: list[Row], key: str, ref: Row, plot: Plot | None
) -> list[Block]:
    label = BY_KEY[METRICS[key]].label.lower()
    blocks: list[Block] = [
        ("h1", f"Study: {study.title}"),
        ("meta", f"Study file: {study.path}; runs in {out.resolve()}; budget: {budget_text(study, quick)}."),
        ("p", _headline(rows, key, ref)),
    ]
    if study.spec.about:
        blocks.append(("p", study.spec.about))
    blocks += [("h2", "Results"), ("table", _table(rows, key, ref))]
    for r in rows:
        if r.status == "failed":
            blocks.append(("p", f"{r.name} failed: {r.error}"))
    if plot is not None:
        blocks += [("h2", f"Held-out {label} against training time"), ("plot", plot)]
    variants = Table(["variant", "what it tries", "builds on"])
    for v in study.spec.variants:
        variants.rows.append([Cell(v.name), Cell(v.about or "—"), Cell(v.extends or "base")])
    blocks += [
        ("h2", "Variants"),
        ("table", variants),
        ("h2", "Study file"),
        ("code", study.path.read_text(errors="replace")),
    ]
    return blocks


def _headline(rows: list[Row], key: str, ref: Row) -> str:
    metric = BY_KEY[METRICS[key]]
    top = best(rows, key)
    if top is None:
        return "No variant has finished yet."
    text = f"Best held-out {metric.label.lower()}: {top.name}, {metric.fmt(top.value)}"
    if top is not ref and math.isfinite(ref.value):
        text += f" ({_change_text(change(top.value, ref.value, key), key)} against {ref.name}, {metric.fmt(ref.value)})"
    missing = [r.name for r in rows if r.status != "done"]
    if missing:
        text += f". Not in the comparison: {', '.join(missing)} (failed or not run)"
    return text + "."


def _change_text(c: float, key: str) -> str:
    if not math.isfinite(c):
        return "—"
    return points(c) if key == "eval_accuracy" else f"{100 * c:+.1f}%"


def _table(rows: list[Row], key: str, ref: Row) -> Table:
    metric = BY_KEY[METRICS[key]]
    top = best(rows, key)
    # The generation metrics, where some variant logged them: a column each.
    gen = [k for k in JUDGE_KEYS if any(k in r.generation for r in rows)]
    # The lm-eval task rows (alignkd.study.tasks), where some variant has them: the score and what it kept, each.
    tasks = list(dict.fromkeys(label for r in rows for label in r.tasks))
    t = Table(
        ["variant", "steps", "train min", "other min", f"held-out {metric.label.lower()}", f"vs {ref.name}", "params"]
        + [BY_KEY[k].label for k in gen]
        + [c for label in tasks for c in (label, "kept")]
    )
    for r in rows:
        scored = [Cell(r.tasks.get(label, {}).get(k, "—")) for label in tasks for k in ("student", "kept")]
        if r.status != "done":
            t.rows.append(
                [Cell(r.name), Cell("—"), Cell("—"), Cell("—"), Cell(r.status), Cell("—"), Cell("—")]
                + [Cell("—") for _ in gen]
                + [Cell("—") for _ in scored]
            )
            continue
        other = (r.wall_s - r.train_s) / 60 if r.wall_s is not None and r.train_s is not None else math.nan
        vs = "reference" if r is ref else _change_text(change(r.value, ref.value, key), key)
        t.rows.append(
            [
                Cell(r.name),
                Cell(f"{r.steps:,}" if r.steps is not None else "—"),
                Cell(_minutes(r.train_s / 60 if r.train_s is not None else math.nan)),
                Cell(_minutes(other)),
                Cell(metric.fmt(r.value) if math.isfinite(r.value) else "nan", bold=r is top),
                Cell(vs),
                Cell(BY_KEY["params"].fmt(r.params) if r.params is not None else "—"),
            ]
            + [Cell(shown(r.generation.get(k), BY_KEY[k].fmt), bold=r is _best_at(rows, k)) for k in gen]
            + scored
        )
    teacher = next((r.teacher for r in (ref, *rows) if math.isfinite(r.teacher)), math.nan)
    # The teacher's task scores: the reference's teacher's (each variant's retention is against its own teacher).
    teacher_tasks = [
        next((r.tasks[label]["teacher"] for r in (ref, *rows) if label in r.tasks), "—") for label in tasks
    ]
    if math.isfinite(teacher) or tasks:
        held_out = metric.fmt(teacher) if math.isfinite(teacher) else "—"
        t.rows.append(
            [Cell("teacher"), Cell(""), Cell(""), Cell(""), Cell(held_out), Cell(""), Cell("")]
            + [Cell("") for _ in gen]
            + [c for v in teacher_tasks for c in (Cell(v), Cell(""))]
        )
    return t


def _best_at(rows: list[Row], key: str) -> Row | None:
    """The variant with the best value of generation metric ``key``."""
    have = [r for r in rows if math.isfinite(r.generation.get(key, math.nan))]
    if not have:
        return None
    sign = 1 if BY_KEY[key].better == "higher" else -1
    return max(have, key=lambda r: sign * r.generation[key])


def _minutes(m: float) -> str:
    """Minutes to two decimals; under a tenth of a minute (quick studies), seconds."""
    if not math.isfinite(m):
        return "—"
    return f"{m:.2f}" if m >= 0.1 else f"{60 * m:.1f} s"


def _curves(rows: list[Row], key: str, ref: Row) -> Plot | None:
    import matplotlib

    drawn = [r for r in rows if r.status == "done" and any(math.isfinite(p["train_s"]) for p in r.curve)]
    if not drawn:
        return None
    metric = BY_KEY[METRICS[key]]
    with matplotlib.rc_context(STYLE):
        fig = new_figure(4.2)
        ax = fig.subplots()
        curves = []
        longest = max(p["train_s"] for r in drawn for p in r.curve if math.isfinite(p["train_s"]))
        unit, per = ("minutes", 60.0) if longest >= 120 else ("seconds", 1.0)
        for i, r in enumerate(drawn):
            pts = [(p["train_s"] / per, p["value"]) for p in r.curve if math.isfinite(p["train_s"])]
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            ax.plot(
                xs,
                ys,
                color=PALETTE[i % len(PALETTE)],
                marker="o",
                markersize=3.5,
                label=r.name,
                linewidth=2.2 if r is ref else 1.6,
            )
            curves.append(ys)
        if math.isfinite(ref.teacher):
            ax.axhline(ref.teacher, color="#888888", linestyle=":", linewidth=1.2, label="teacher")
            curves.append([ref.teacher])
        log_if_wide(ax, *curves)
        ax.set_xlabel(f"training {unit}")
        ax.set_ylabel(metric.label.lower())
        ax.set_title(f"Held-out {metric.label.lower()} against training time")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        image = png(fig)
    caption = (
        f"Each variant's held-out {metric.label.lower()} at each of its evaluations, against its training clock "
        "(what the minutes budget counts; set-up and block selection not included)"
        + ("; dotted: the reference's teacher on the same blocks." if math.isfinite(ref.teacher) else ".")
    )
    return Plot("curves", f"Held-out {metric.label.lower()} against training time", caption, image)
