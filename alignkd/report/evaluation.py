"""The report's evaluation and retention tables, derived from the metric catalogue of ``alignkd eval``."""

from __future__ import annotations

import math
from collections.abc import Callable

from alignkd.evaluate.catalogue import KEPT, METRICS, count, general, number, shown
from alignkd.report.document import Block, Cell, Table
from alignkd.report.runlog import finite

# The rows of each table: (key, label, format, which way is better); None: a count or setting, never bold.
Spec = list[tuple[str, str, Callable[[float], str], str | None]]
EVAL_ROWS: Spec = [(m.key, m.label, m.fmt, m.better) for m in METRICS if not m.fidelity]
# Generations scored against the teacher's own generations: how closely each model imitates it.
FIDELITY_ROWS: Spec = [(m.key, m.label, m.fmt, m.better) for m in METRICS if m.fidelity]
RETENTION_ROWS: Spec = [(k.key, k.label, k.fmt, k.better) for k in KEPT]


def _metric_rows(
    spec: Spec,
    columns: list[str],
    values: dict[str, dict],
    candidates: list[str],
    extra_ok: Callable[[str], bool] = lambda k: False,
) -> list[list[Cell]]:
    """One row per metric any column has, formatted; the best of ``candidates`` in bold.

    Keys the spec does not know (a metric added to ``alignkd eval`` later) follow in
    the order they appear, when ``extra_ok`` accepts them, in a general format.
    """
    known = {k for k, *_ in spec}
    extra: dict[str, None] = {}
    for col in columns:
        for k in values.get(col, {}):
            if k not in known and extra_ok(k):
                extra.setdefault(k)
    rows = []
    for key, label, fmt, better in spec + [(k, k, general, None) for k in extra]:
        if not any(key in values.get(col, {}) for col in columns):
            continue
        cells = [Cell(label)]
        # "—": not measured for this model; "nan": measured, and it diverged.
        texts = {col: shown(values.get(col, {}).get(key), fmt) for col in columns}
        bold = _best(key, better, values, candidates, texts)
        cells += [Cell(texts[col], col in bold) for col in columns]
        rows.append(cells)
    return rows


def _best(
    key: str, better: str | None, values: dict[str, dict], candidates: list[str], texts: dict[str, str]
) -> set[str]:
    """Columns holding the best value of a row; none when there is nothing to choose between."""
    scored = {c: number(values.get(c, {}).get(key)) for c in candidates}
    scored = {c: v for c, v in scored.items() if math.isfinite(v)}
    if better is None or len(scored) < 2:
        return set()
    top = (min if better == "lower" else max)(scored, key=scored.get)
    # Compare as shown: values that print the same are a tie, and an all-way tie bolds nothing.
    winners = {c for c in scored if texts[c] == texts[top]}
    return set() if len(winners) == len(scored) else winners


def model_order(names: list[str]) -> list[str]:
    """Teacher, student, then the rest as given."""
    first = [n for n in ("teacher", "student") if n in names]
    return first + [n for n in names if n not in first]


def evaluation_blocks(ev: dict) -> list[Block]:
    models = ev.get("models") if isinstance(ev.get("models"), dict) else {}
    metrics = {
        n: m.get("metrics", {}) for n, m in models.items() if isinstance(m, dict) and isinstance(m.get("metrics"), dict)
    }
    blocks: list[Block] = []
    if metrics:
        columns = model_order(list(metrics))
        candidates = [c for c in columns if c != "teacher"]
        table = Table(["Metric"] + columns)
        table.rows += _metric_rows(EVAL_ROWS, columns, metrics, candidates, lambda k: not k.endswith("_vs_teacher"))
        fidelity = _metric_rows(FIDELITY_ROWS, columns, metrics, candidates, lambda k: k.endswith("_vs_teacher"))
        if fidelity:
            table.rows.append("Fidelity to the teacher (generations scored against the teacher's)")
            table.rows += fidelity
        blocks += [("h2", "Evaluation")]
        settings = settings_sentence(ev.get("settings"))
        if settings:
            blocks.append(("p", settings))
        blocks.append(("table", table))
        paths = [f"{n}: {models[n]['path']}" for n in columns if isinstance(models[n].get("path"), str)]
        if paths:
            blocks.append(
                ("p", "Models: " + "; ".join(paths) + ". Bold: the best of the models other than the teacher.")
            )
    retention = ev.get("retention") if isinstance(ev.get("retention"), dict) else {}
    retention = {n: r for n, r in retention.items() if isinstance(r, dict) and r}
    if retention:
        columns = model_order(list(retention))
        table = Table(["Against the teacher"] + columns)
        table.rows += _metric_rows(RETENTION_ROWS, columns, retention, columns, lambda k: True)
        blocks += [
            ("h2", "Retention and speed-up"),
            (
                "p",
                "Each model against the teacher, as alignkd eval computed it: the share of the teacher's score it "
                "keeps (model / teacher; teacher / model for perplexity and CER, where lower is better; 100% matches "
                "the teacher, above beats it), the share of the teacher's accuracy above chance it keeps "
                "((model - chance) / (teacher - chance), chance being the majority class's share of the examples), "
                "how many times faster it runs per token, and its parameters as a share of the teacher's.",
            ),
            ("table", table),
        ]
        blocks += [("p", f"Warning: {w}.") for w in warnings_of(ev)]
    return blocks


def warnings_of(ev: dict) -> list[str]:
    """``eval.json``'s warnings (e.g. a teacher near chance), as written by alignkd eval."""
    warnings = ev.get("warnings")
    return [w for w in warnings if isinstance(w, str)] if isinstance(warnings, list) else []


def settings_sentence(s) -> str:
    if not isinstance(s, dict) or not s:
        return ""
    parts = []
    if "device" in s or "dtype" in s:
        parts.append(f"Evaluated on {s.get('device', '?')} in {s.get('dtype', '?')}")
    if "ppl_tokens" in s:
        source = f" of {s['text']}" if isinstance(s.get("text"), str) else ""
        parts.append(
            f"perplexity over up to {fmt_or_nan(s['ppl_tokens'], count)} held-out tokens{source} "
            f"(window {s.get('window', '?')}, stride {s.get('stride', '?')})"
        )
    if "examples" in s:
        source = f" from {s['labelled']}" if isinstance(s.get("labelled"), str) else ""
        parts.append(f"accuracy on {s['examples']} labelled examples{source} ({s.get('shots', 0)}-shot for causal LMs)")
    if "prompts" in s:
        parts.append(f"generation metrics on {s['prompts']} prompts × {s.get('new_tokens', '?')} greedy tokens")
    if "latency_len" in s:
        parts.append(f"latency at batch {s.get('latency_batch', 1)}, prompt length {s['latency_len']}")
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "." if sentence else ""


def fmt_or_nan(v, fmt) -> str:
    return fmt(number(v)) if finite(v) else "nan"
