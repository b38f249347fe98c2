"""The run report: plots and tables of one distillation run, as report.html and report.md.

Reads only what a run wrote to disk (``alignkd distill`` and ``alignkd eval``):

    RUN_DIR/metrics.jsonl   training and eval records, one JSON object a line (required)
    RUN_DIR/config.yaml     the resolved config, shown verbatim
    RUN_DIR/summary.json    parameter counts, training time, eval before and after
    RUN_DIR/eval.json       ``alignkd eval`` output: metrics per model, retention

and, for each baseline run (``--baseline-run NAME=DIR``), that run's metrics.jsonl,
whose CE loss and eval perplexity are drawn over the distilled run's.

The report is built once as a list of blocks (headings, paragraphs, tables, plots,
code) and rendered twice, so the HTML and the Markdown hold the same tables:
report.html is self-contained (plots as base64 PNG data URIs, inline CSS, nothing
fetched), report.md links its plots from ``report_files/``.
"""

from __future__ import annotations

from alignkd.errors import ReportError

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alignkd import __version__


# ---------------------------------------------------------------- reading runs


@dataclass
class RunLog:
    """The records of one run's metrics.jsonl, split, sorted by step, one record per step."""

    name: str
    path: Path
    train: list[dict]
    eval: list[dict]
    skipped: int = 0  # lines that were not JSON objects (e.g. cut off by a crash mid-write)

    def series(self, key: str, split: str = "train") -> tuple[list[int], list[float]]:
        """Steps and values of ``key``, NaN where a record lacks it or holds no number."""
        records = self.train if split == "train" else self.eval
        rows = [(r["step"], _number(r.get(key))) for r in records if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def keys(self, prefix: str, split: str = "train") -> list[str]:
        """Keys starting with ``prefix``, in the order the records first show them."""
        records = self.train if split == "train" else self.eval
        seen: dict[str, None] = {}
        for r in records:
            for k in r:
                if k.startswith(prefix):
                    seen.setdefault(k)
        return list(seen)


def read_run(path: str | Path, name: str | None = None) -> RunLog:
    """Read ``path/metrics.jsonl``; a missing folder or file is a ReportError."""
    path = Path(path)
    log = path / "metrics.jsonl"
    if not log.is_file():
        raise ReportError(f"no metrics.jsonl in {path}: is it an alignkd distill output_dir?")
    by_step: dict[tuple[str, int], dict] = {}
    skipped = 0
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)  # Python's json reads the NaN and Infinity that train.py writes
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            skipped += 1
            continue
        # A resumed run logs again the steps after its checkpoint: the later record wins.
        by_step[(rec.get("split", "train"), int(rec["step"]))] = rec
    ordered = [by_step[k] for k in sorted(by_step, key=lambda k: k[1])]
    return RunLog(
        name=name or path.resolve().name,
        path=path,
        train=[r for r in ordered if r.get("split", "train") == "train"],
        eval=[r for r in ordered if r.get("split") == "eval"],
        skipped=skipped,
    )


def _read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); write it again") from None
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} should hold a JSON object, not {type(data).__name__}")
    return data


def _number(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _finite(v) -> bool:
    return math.isfinite(_number(v))


# ---------------------------------------------------------------- formats


def _fixed(n: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{n}f}"


def _percent(v: float) -> str:
    return f"{100 * v:.1f}%"


def _count(v: float) -> str:
    return f"{round(v):,}"


def _millions(v: float) -> str:
    return f"{v / 1e6:.2f}M"


def _times(v: float) -> str:
    return f"{v:.2f}×"


# The evaluation rows, in order: (key in eval.json, label, format, which way is better).
# None: a count or setting, never bold. Parameters and size are costs: fewer is better.
EVAL_ROWS: list[tuple[str, str, Callable[[float], str], str | None]] = [
    ("perplexity", "Perplexity", _fixed(2), "lower"),
    ("ppl_tokens_scored", "Tokens scored (perplexity)", _count, None),
    ("accuracy", "Accuracy", _percent, "higher"),
    ("accuracy_examples", "Examples (accuracy)", _count, None),
    ("bleu", "BLEU", _fixed(1), "higher"),
    ("rouge1", "ROUGE-1", _fixed(3), "higher"),
    ("rouge2", "ROUGE-2", _fixed(3), "higher"),
    ("rougeL", "ROUGE-L", _fixed(3), "higher"),
    ("cer", "CER", _fixed(3), "lower"),
    ("prefill_ms_per_token", "Prefill ms/token", _fixed(2), "lower"),
    ("decode_ms_per_token", "Decode ms/token", _fixed(2), "lower"),
    ("prefill_tokens_per_s", "Prefill tokens/s", _fixed(0), "higher"),
    ("decode_tokens_per_s", "Decode tokens/s", _fixed(0), "higher"),
    ("params", "Parameters", _millions, "lower"),
    ("non_embedding_params", "Non-embedding parameters", _millions, "lower"),
    ("size_mb", "Size (MB)", _fixed(1), "lower"),
]
# Generations scored against the teacher's own generations: how closely each model imitates it.
FIDELITY_ROWS: list[tuple[str, str, Callable[[float], str], str | None]] = [
    ("bleu_vs_teacher", "BLEU vs teacher", _fixed(1), "higher"),
    ("rouge1_vs_teacher", "ROUGE-1 vs teacher", _fixed(3), "higher"),
    ("rouge2_vs_teacher", "ROUGE-2 vs teacher", _fixed(3), "higher"),
    ("rougeL_vs_teacher", "ROUGE-L vs teacher", _fixed(3), "higher"),
    ("cer_vs_teacher", "CER vs teacher", _fixed(3), "lower"),
]
RETENTION_ROWS: list[tuple[str, str, Callable[[float], str], str | None]] = [
    ("perplexity", "Perplexity retained", _percent, "higher"),
    ("accuracy", "Accuracy retained", _percent, "higher"),
    ("bleu", "BLEU retained", _percent, "higher"),
    ("rouge1", "ROUGE-1 retained", _percent, "higher"),
    ("rouge2", "ROUGE-2 retained", _percent, "higher"),
    ("rougeL", "ROUGE-L retained", _percent, "higher"),
    ("cer", "CER retained", _percent, "higher"),
    ("prefill_speedup", "Prefill speed-up", _times, "higher"),
    ("decode_speedup", "Decode speed-up", _times, "higher"),
    ("params", "Parameters (share of teacher)", _percent, "lower"),
]


def _general(v: float) -> str:
    return f"{v:.4g}"


# ---------------------------------------------------------------- the document


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    columns: list[str]  # the first is the row-label column
    rows: list[list[Cell] | str] = field(default_factory=list)  # a str is a group heading row


@dataclass
class Plot:
    name: str  # file stem and img id
    title: str  # alt text
    caption: str
    png: bytes


# Blocks: ("h1"|"h2"|"p", str), ("table", Table), ("plot", Plot), ("code", str).
Block = tuple[str, object]


def _metric_rows(
    spec: list[tuple[str, str, Callable[[float], str], str | None]],
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
    for key, label, fmt, better in spec + [(k, k, _general, None) for k in extra]:
        if not any(key in values.get(col, {}) for col in columns):
            continue
        cells = [Cell(label)]
        texts = {}
        for col in columns:
            v = values.get(col, {}).get(key)
            if v is None:
                texts[col] = "—"  # not measured for this model
            elif not _finite(v):
                texts[col] = "nan"  # measured, and it diverged
            else:
                texts[col] = fmt(_number(v))
        bold = _best(key, better, values, candidates, texts)
        cells += [Cell(texts[col], col in bold) for col in columns]
        rows.append(cells)
    return rows


def _best(key: str, better: str | None, values: dict[str, dict], candidates: list[str], texts: dict[str, str]) -> set[str]:
    """Columns holding the best value of a row; none when there is nothing to choose between."""
    scored = {c: _number(values.get(c, {}).get(key)) for c in candidates}
    scored = {c: v for c, v in scored.items() if math.isfinite(v)}
    if better is None or len(scored) < 2:
        return set()
    top = (min if better == "lower" else max)(scored, key=scored.get)
    # Compare as shown: values that print the same are a tie, and an all-way tie bolds nothing.
    winners = {c for c in scored if texts[c] == texts[top]}
    return set() if len(winners) == len(scored) else winners


def _model_order(names: list[str]) -> list[str]:
    """Teacher, student, then the rest as given."""
    first = [n for n in ("teacher", "student") if n in names]
    return first + [n for n in names if n not in first]


def _evaluation_blocks(ev: dict) -> list[Block]:
    models = ev.get("models") if isinstance(ev.get("models"), dict) else {}
    metrics = {n: m.get("metrics", {}) for n, m in models.items() if isinstance(m, dict) and isinstance(m.get("metrics"), dict)}
    blocks: list[Block] = []
    if metrics:
        columns = _model_order(list(metrics))
        candidates = [c for c in columns if c != "teacher"]
        table = Table(["Metric"] + columns)
        table.rows += _metric_rows(EVAL_ROWS, columns, metrics, candidates, lambda k: not k.endswith("_vs_teacher"))
        fidelity = _metric_rows(FIDELITY_ROWS, columns, metrics, candidates, lambda k: k.endswith("_vs_teacher"))
        if fidelity:
            table.rows.append("Fidelity to the teacher (generations scored against the teacher's)")
            table.rows += fidelity
        blocks += [("h2", "Evaluation")]
        settings = _settings_sentence(ev.get("settings"))
        if settings:
            blocks.append(("p", settings))
        blocks.append(("table", table))
        paths = [f"{n}: {models[n]['path']}" for n in columns if isinstance(models[n].get("path"), str)]
        if paths:
            blocks.append(("p", "Models: " + "; ".join(paths) + ". Bold: the best of the models other than the teacher."))
    retention = ev.get("retention") if isinstance(ev.get("retention"), dict) else {}
    retention = {n: r for n, r in retention.items() if isinstance(r, dict) and r}
    if retention:
        columns = _model_order(list(retention))
        table = Table(["Against the teacher"] + columns)
        table.rows += _metric_rows(RETENTION_ROWS, columns, retention, columns, lambda k: True)
        blocks += [
            ("h2", "Retention and speed-up"),
            (
                "p",
                "Each model against the teacher, as alignkd eval computed it: the share of the teacher's score it "
                "keeps (model / teacher; teacher / model for perplexity and CER, where lower is better; 100% matches "
                "the teacher, above beats it), how many times faster it runs per token, and its parameters as a "
                "share of the teacher's.",
            ),
            ("table", table),
        ]
    return blocks


def _settings_sentence(s) -> str:
    if not isinstance(s, dict) or not s:
        return ""
    parts = []
    if "device" in s or "dtype" in s:
        parts.append(f"Evaluated on {s.get('device', '?')} in {s.get('dtype', '?')}")
    if "ppl_tokens" in s:
        source = f" of {s['text']}" if isinstance(s.get("text"), str) else ""
        parts.append(f"perplexity over up to {_fmt_or_nan(s['ppl_tokens'], _count)} held-out tokens{source} (window {s.get('window', '?')}, stride {s.get('stride', '?')})")
    if "examples" in s:
        source = f" from {s['labelled']}" if isinstance(s.get("labelled"), str) else ""
        parts.append(f"accuracy on {s['examples']} labelled examples{source} ({s.get('shots', 0)}-shot for causal LMs)")
    if "prompts" in s:
        parts.append(f"generation metrics on {s['prompts']} prompts × {s.get('new_tokens', '?')} greedy tokens")
    if "latency_len" in s:
        parts.append(f"latency at batch {s.get('latency_batch', 1)}, prompt length {s['latency_len']}")
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "." if sentence else ""


def _headline(run: RunLog, summary: dict | None, ev: dict | None, baselines: list[RunLog]) -> str:
    """One paragraph: sizes, perplexities, retention and speed-up, training length."""
    metrics = {}
    if ev and isinstance(ev.get("models"), dict):
        metrics = {n: m.get("metrics", {}) for n, m in ev["models"].items() if isinstance(m, dict) and isinstance(m.get("metrics"), dict)}
    summary = summary or {}
    out = []

    tp = _number(metrics.get("teacher", {}).get("params", summary.get("teacher_params")))
    sp = _number(metrics.get("student", {}).get("params", summary.get("student_params")))
    if math.isfinite(tp) and math.isfinite(sp) and tp > 0:
        change = "fewer" if sp <= tp else "more"
        out.append(f"The student has {_millions(sp)} parameters against the teacher's {_millions(tp)} ({abs(1 - sp / tp):.1%} {change}).")

    ppl = {n: m["perplexity"] for n, m in metrics.items() if "perplexity" in m}
    if ppl:
        shown = ", ".join(f"{n} {_fmt_or_nan(ppl[n], _fixed(2))}" for n in _model_order(list(ppl)))
        out.append(f"Held-out perplexity: {shown}.")
    else:
        # No eval.json: the eval split the run itself scored, before (teacher) and after training.
        ev_ppl = {}
        if isinstance(summary.get("teacher_eval"), dict) and "eval_ppl" in summary["teacher_eval"]:
            ev_ppl["teacher"] = summary["teacher_eval"]["eval_ppl"]
        last = _last(run.series("eval_ppl", "eval")[1])
        if last is not None:
            ev_ppl["student"] = last
        for b in baselines:
            v = _last(b.series("eval_ppl", "eval")[1])
            if v is not None:
                ev_ppl[b.name] = v
        if ev_ppl:
            out.append("Eval-split perplexity at the end of training: " + ", ".join(f"{n} {_fmt_or_nan(v, _fixed(2))}" for n, v in ev_ppl.items()) + ".")

    ret = (ev or {}).get("retention")
    if isinstance(ret, dict) and ret:
        name = "student" if isinstance(ret.get("student"), dict) else next((n for n, r in ret.items() if isinstance(r, dict)), None)
        r = ret.get(name, {}) if name else {}
        kept = [f"{label} {_percent(_number(r[k]))}" for k, label in (("perplexity", "perplexity"), ("accuracy", "accuracy"), ("bleu", "BLEU")) if _finite(r.get(k))]
        fast = [f"{_times(_number(r[k]))} faster at {kind}" for k, kind in (("prefill_speedup", "prefill"), ("decode_speedup", "decoding")) if _finite(r.get(k))]
        if kept:
            out.append(f"Against the teacher the {name} keeps {', '.join(kept)}" + (f"; it is {' and '.join(fast)}." if fast else "."))
        elif fast:
            out.append(f"The {name} is {' and '.join(fast)} than the teacher.")

    steps = len(run.train)
    if steps:
        _, loss = run.series("loss")
        first, last = _first(loss), _last(loss)
        text = f"Trained {int(run.train[-1]['step'])} steps"
        if _finite(summary.get("train_seconds")):
            text += f" in {_duration(_number(summary['train_seconds']))}"
        if first is not None and last is not None:
            text += f"; total loss {first:.4g} → {last:.4g}"
        out.append(text + ".")
    else:
        out.append("The run logged no training steps.")
    if baselines:
        out.append("Baseline runs drawn for comparison: " + ", ".join(f"{b.name} ({b.path})" for b in baselines) + ".")
    return " ".join(out)


def _fmt_or_nan(v, fmt) -> str:
    return fmt(_number(v)) if _finite(v) else "nan"


def _first(values: list[float]) -> float | None:
    return next((v for v in values if math.isfinite(v)), None)


def _last(values: list[float]) -> float | None:
    return next((v for v in reversed(values) if math.isfinite(v)), None)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- plots

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
BASELINE_STYLES = [("#555555", "--"), ("#e08a00", "-."), ("#7b4fa0", ":"), ("#2a9d8f", "--")]
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.edgecolor": "#999999",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "legend.fontsize": 8,
    "lines.linewidth": 1.6,
}
WIDTH_IN, DPI = 9.6, 120  # about 1150 px wide: sharp when the page shows it at ~960 px


def _smooth(values: list[float]) -> list[float] | None:
    """A centred moving average that skips NaN; None when the curve is too short to need one."""
    n = len(values)
    if n < 10:
        return None
    half = max(1, round(n / 24))  # ~4% of the run on each side: light, keeps the shape
    out = []
    for i in range(n):
        window = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def _log_if_wide(ax, *curves: list[float]) -> None:
    """Log y when the positive values span more than two decades (losses that fall by 100×)."""
    vals = [v for c in curves for v in c if math.isfinite(v)]
    if vals and min(vals) > 0 and max(vals) / min(vals) > 100:
        ax.set_yscale("log")


def _line(ax, steps, values, *, color, label=None, smooth=True, **kw) -> None:
    """The raw curve, light, under its moving average; markers when there are few points."""
    few = len(steps) < 10
    avg = _smooth(values) if smooth else None
    if avg is None:
        ax.plot(steps, values, color=color, label=label, marker="o" if few else None, markersize=3.5, **kw)
    else:
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1.0, **kw)
        ax.plot(steps, avg, color=color, label=label, **kw)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same run gives the same bytes.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _new_figure(height_in: float):
    # The object API with the Agg canvas: no pyplot, no global backend switch (so a
    # notebook's backend is left alone) and no display needed, which is what
    # matplotlib.use("Agg") would otherwise be for.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _term_colors(names: list[str]) -> dict[str, str]:
    unique = list(dict.fromkeys(names))
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(unique)}


def _steps_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # no step 2.5 on a three-step run
    lo, hi = ax.get_xlim()
    if hi - lo < 2:  # a single point: a little room on each side, in whole steps
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)


def _plot_losses(run: RunLog, baselines: list[RunLog], colors: dict[str, str]) -> Plot | None:
    terms = [k[len("loss/") :] for k in run.keys("loss/")]
    base_ce = [(b, *b.series("loss/ce")) for b in baselines if b.keys("loss/ce")]
    if base_ce and "ce" not in terms:
        terms.append("ce")  # the run has no CE term, but the baselines' CE is still worth seeing
    panels = terms + (["total"] if any("loss" in r for r in run.train) else [])
    if not panels:
        return None
    ncols = 1 if len(panels) == 1 else 2 if len(panels) in (2, 4) else 3
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(2.5 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        key = "loss" if panel == "total" else f"loss/{panel}"
        steps, values = run.series(key)
        color = "#222222" if panel == "total" else colors.get(panel, PALETTE[0])
        curves = [values]
        if steps:
            _line(ax, steps, values, color=color, label=f"{run.name} (distilled)" if panel == "ce" and base_ce else None)
        if panel == "ce":
            for i, (b, bs, bv) in enumerate(base_ce):
                bcolor, dash = BASELINE_STYLES[i % len(BASELINE_STYLES)]
                _line(ax, bs, bv, color=bcolor, label=f"{b.name} (baseline)", linestyle=dash)
                curves.append(bv)
            if base_ce:
                ax.legend(loc="upper right")
        _log_if_wide(ax, *curves)
        ax.set_title("total (weighted)" if panel == "total" else panel)
        _steps_axis(ax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Training loss per term", fontsize=11)
    smoothed = _smooth(run.series("loss")[1]) is not None
    caption = "Each loss term as logged" + (" (light) under its moving average (solid)" if smoothed else "") + "; a log axis where a term spans over 100×."
    if base_ce:
        caption += " Dashed: the baseline runs' CE loss on their own batches."
    return Plot("losses", "Training loss per term", caption, _png(fig))


def _eval_key(run: RunLog, baselines: list[RunLog]) -> str | None:
    for key in ("eval_ppl", "eval_accuracy", "eval_loss"):
        if any(key in r for b in [run, *baselines] for r in b.eval):
            return key
    return None


def _plot_eval(run: RunLog, baselines: list[RunLog], summary: dict | None) -> Plot | None:
    key = _eval_key(run, baselines)
    if key is None:
        return None
    label = {"eval_ppl": "perplexity", "eval_accuracy": "accuracy", "eval_loss": "loss"}[key]
    fig = _new_figure(3.6)
    ax = fig.subplots()
    curves = []
    steps, values = run.series(key, "eval")
    if steps:
        ax.plot(steps, values, color=PALETTE[0], marker="o", markersize=4, label=f"{run.name} (distilled)")
        curves.append(values)
    for i, b in enumerate(baselines):
        bs, bv = b.series(key, "eval")
        if bs:
            bcolor, dash = BASELINE_STYLES[i % len(BASELINE_STYLES)]
            ax.plot(bs, bv, color=bcolor, linestyle=dash, marker="s", markersize=3.5, label=f"{b.name} (baseline)")
            curves.append(bv)
    teacher = _number(((summary or {}).get("teacher_eval") or {}).get(key))
    if math.isfinite(teacher):
        ax.axhline(teacher, color="#888888", linestyle=":", linewidth=1.2, label="teacher")
        curves.append([teacher])
    _log_if_wide(ax, *curves)
    _steps_axis(ax)
    ax.set_ylabel(label)
    ax.set_title(f"Held-out {label} during training")
    ax.legend(loc="best")
    caption = "The run's eval split, scored every train.eval_every steps" + (", beside the baseline runs" if baselines else "") + (
        "; dotted: the teacher on the same split." if math.isfinite(teacher) else "."
    )
    return Plot("eval", f"Held-out {label} during training", caption, _png(fig))


def _plot_weights(run: RunLog, colors: dict[str, str]) -> Plot | None:
    keys = run.keys("w/")
    if not keys:
        return None
    fig = _new_figure(3.2)
    ax = fig.subplots()
    for k in keys:
        steps, values = run.series(k)
        name = k[len("w/") :]
        ax.plot(steps, values, color=colors.get(name, PALETTE[0]), label=name, marker="o" if len(steps) < 10 else None, markersize=3.5)
    _steps_axis(ax)
    ax.set_ylabel("weight")
    ax.set_title("Loss weights over training")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return Plot("weights", "Loss weights over training", "The weight of each term at each step (set by the weighting strategy and any weight schedule).", _png(fig))


def _plot_schedules(run: RunLog, colors: dict[str, str]) -> Plot | None:
    temps = run.keys("temperature/")
    logged = set(run.keys(""))
    panels = [p for p in ("lr", "temperature", "grad_norm") if (temps if p == "temperature" else p in logged)]
    if not panels:
        return None
    fig = _new_figure(2.8)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        few = len(run.train) < 10
        if panel == "lr":
            steps, values = run.series("lr")
            ax.plot(steps, values, color="#333333", marker="o" if few else None, markersize=3.5)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.set_title("learning rate")
        elif panel == "temperature":
            for k in temps:
                steps, values = run.series(k)
                name = k[len("temperature/") :]
                ax.plot(steps, values, color=colors.get(name, PALETTE[0]), label=name, marker="o" if few else None, markersize=3.5)
            ax.legend(loc="best")
            ax.set_title("temperature")
        else:
            steps, values = run.series("grad_norm")
            _line(ax, steps, values, color="#555555")
            _log_if_wide(ax, values)
            ax.set_title("gradient norm (before clipping)")
        _steps_axis(ax)
    shown = {"lr": "the learning rate", "temperature": "the scheduled temperatures", "grad_norm": "the gradient norm before clipping"}
    names = [shown[p] for p in panels]
    caption = (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]).capitalize() + "."
    return Plot("schedules", "Learning rate, temperatures and gradient norm", caption, _png(fig))


def _plots(run: RunLog, baselines: list[RunLog], summary: dict | None) -> tuple[list[Plot], list[Plot]]:
    """(training curves, weights and schedules)."""
    import matplotlib

    colors = _term_colors([k[len("loss/") :] for k in run.keys("loss/")] + ["ce"])
    with matplotlib.rc_context(STYLE):
        curves = [_plot_losses(run, baselines, colors), _plot_eval(run, baselines, summary)]
        schedules = [_plot_weights(run, colors), _plot_schedules(run, colors)]
    return [p for p in curves if p], [p for p in schedules if p]


# ---------------------------------------------------------------- rendering

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       background: #fff; margin: 0; line-height: 1.5; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.lead { font-size: 1.05em; background: #f6f8fa; border-left: 4px solid #1f77b4; padding: 10px 14px; }
p.meta { color: #666; font-size: 0.9em; margin-top: 0; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e5e5e5; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; border-bottom: 2px solid #ccc; }
th:first-child, td:first-child { text-align: left; }
tr.group td { text-align: left; font-style: italic; color: #555; background: #fafafa; padding-top: 10px; }
td strong { color: #0b5394; }
pre { background: #f6f8fa; border: 1px solid #e5e5e5; padding: 12px; overflow-x: auto; font-size: 0.85em; }
footer { color: #888; font-size: 0.8em; margin-top: 3em; }
"""


def _html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
    ]
    lead_done = False
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"<h1>{e(body)}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{e(body)}</h2>")
        elif kind == "meta":
            out.append(f'<p class="meta">{e(body)}</p>')
        elif kind == "p":
            cls = "" if lead_done else ' class="lead"'
            lead_done = True
            out.append(f"<p{cls}>{e(body)}</p>")
        elif kind == "table":
            out.append(_html_table(body))
        elif kind == "plot":
            data = base64.b64encode(body.png).decode("ascii")
            out.append(
                f'<figure><img id="plot-{e(body.name)}" src="data:image/png;base64,{data}" alt="{e(body.title)}">'
                f"<figcaption>{e(body.caption)}</figcaption></figure>"
            )
        elif kind == "code":
            out.append(f"<pre><code>{e(body)}</code></pre>")
    out += [f"<footer>Written by alignkd {e(__version__)} (alignkd report).</footer>", "</main>", "</body>", "</html>", ""]
    return "\n".join(out)


def _html_table(t: Table) -> str:
    e = html.escape
    rows = ["<table>", "<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr></thead>", "<tbody>"]
    for row in t.rows:
        if isinstance(row, str):
            rows.append(f'<tr class="group"><td colspan="{len(t.columns)}">{e(row)}</td></tr>')
            continue
        tds = []
        for c in row:
            text = e(c.text)
            tds.append(f"<td><strong>{text}</strong></td>" if c.bold else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    rows += ["</tbody>", "</table>"]
    return "\n".join(rows)


def _md(blocks: list[Block], files: dict[str, str]) -> str:
    out = []
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"# {body}")
        elif kind == "h2":
            out.append(f"## {body}")
        elif kind in ("p", "meta"):
            out.append(str(body))
        elif kind == "table":
            out.append(_md_table(body))
        elif kind == "plot":
            out.append(f"![{body.title}]({files[body.name]})\n\n*{body.caption}*")
        elif kind == "code":
            # A fence longer than any run of backticks inside, so nothing in the YAML can close it.
            ticks = "`" * max(3, _longest_backticks(str(body)) + 1)
            out.append(f"{ticks}yaml\n{str(body).rstrip()}\n{ticks}")
    out.append(f"*Written by alignkd {__version__} (alignkd report).*")
    return "\n\n".join(out) + "\n"


def _longest_backticks(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in t.columns) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(t.columns) - 1)) + "|"]
    for row in t.rows:
        if isinstance(row, str):
            lines.append("| " + " | ".join([f"*{_md_cell(row)}*"] + [""] * (len(t.columns) - 1)) + " |")
            continue
        lines.append("| " + " | ".join(f"**{_md_cell(c.text)}**" if c.bold else _md_cell(c.text) for c in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry points


def write_report(
    run_dir: str | Path,
    *,
    eval_json: str | Path | None = None,
    baselines: dict[str, str | Path] | None = None,
    out: str | Path | None = None,
) -> dict[str, Path]:
    """Write ``OUT/report.html`` and ``OUT/report.md`` (plots in ``OUT/report_files/``) for a run folder.

    ``eval_json`` defaults to ``RUN_DIR/eval.json`` (skipped when absent); ``baselines``
    maps a name to another run folder whose CE loss and eval curves are overlaid;
    ``out`` defaults to ``RUN_DIR``. Returns ``{"html": path, "md": path}``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"no metrics.jsonl in {run_dir}: is it an alignkd distill output_dir? (no such folder)")
    run = read_run(run_dir)
    base_runs = []
    for name, path in (baselines or {}).items():
        try:
            base_runs.append(read_run(path, name))
        except ReportError as e:
            raise ReportError(f"baseline run {name!r}: {e}") from None
    summary = _read_json(run_dir / "summary.json", "summary")
    if eval_json is not None and not Path(eval_json).is_file():
        raise ReportError(f"no eval.json at {eval_json}: write one with `alignkd eval` or leave out --eval")
    ev = _read_json(Path(eval_json) if eval_json is not None else run_dir / "eval.json", "eval results")
    config = run_dir / "config.yaml"
    config_text = config.read_text(errors="replace") if config.is_file() else None

    out = Path(out) if out is not None else run_dir
    files_dir = out / "report_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    for stale in files_dir.glob("*.png"):  # the folder is the report's own: no plots from an earlier report
        stale.unlink()

    curves, schedules = _plots(run, base_runs, summary)
    blocks: list[Block] = [
        ("h1", f"Distillation report: {run.name}"),
        ("meta", f"Run folder: {run_dir.resolve()}"),
        ("p", _headline(run, summary, ev, base_runs)),
    ]
    skipped = run.skipped + sum(b.skipped for b in base_runs)
    if skipped:
        blocks.append(("p", f"{skipped} line(s) of metrics.jsonl were not JSON records (a write cut off mid-line?) and were skipped."))
    if curves:
        blocks += [("h2", "Training curves")] + [("plot", p) for p in curves]
    if schedules:
        blocks += [("h2", "Weights and schedules")] + [("plot", p) for p in schedules]
    if ev:
        blocks += _evaluation_blocks(ev)
    if config_text is not None:
        blocks += [("h2", "Config"), ("code", config_text)]

    files = {}
    for p in curves + schedules:
        (files_dir / f"{p.name}.png").write_bytes(p.png)
        files[p.name] = f"{files_dir.name}/{p.name}.png"
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(_html(blocks, f"alignkd report: {run.name}"), encoding="utf-8")
    md_path.write_text(_md(blocks, files), encoding="utf-8")
    return {"html": html_path, "md": md_path}


def _parse_baselines(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:  # a bare folder: named after itself
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ReportError(f"--baseline-run expects NAME=DIR, got {spec!r}")
        out[name] = path
    return out


def cli_main(args) -> int:
    """``alignkd report RUN_DIR [--eval EVAL_JSON] [--baseline-run NAME=DIR ...] [--out DIR]``."""
    try:
        paths = write_report(
            args.run_dir,
            eval_json=getattr(args, "eval_json", None),
            baselines=_parse_baselines(getattr(args, "baseline_run", None) or []),
            out=getattr(args, "out", None),
        )
    except ReportError as e:
        print(f"alignkd report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {paths['html']}")
    print(f"report: {paths['md']}")
    return 0
