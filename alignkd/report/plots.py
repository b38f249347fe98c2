"""The report's plots: loss terms, held-out metric, weights and schedules, as PNG bytes (matplotlib, no pyplot)."""

from __future__ import annotations

import io
import math

from alignkd.evaluate.catalogue import number
from alignkd.report.document import Plot
from alignkd.report.runlog import RunLog

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


def log_if_wide(ax, *curves: list[float]) -> None:
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


def png(fig) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same run gives the same bytes.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def new_figure(height_in: float):
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
    fig = new_figure(2.5 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):  # the grid may have more axes than panels
        key = "loss" if panel == "total" else f"loss/{panel}"
        steps, values = run.series(key)
        color = "#222222" if panel == "total" else colors.get(panel, PALETTE[0])
        curves = [values]
        if steps:
            _line(
                ax, steps, values, color=color, label=f"{run.name} (distilled)" if panel == "ce" and base_ce else None
            )
        if panel == "ce":
            for i, (b, bs, bv) in enumerate(base_ce):
                bcolor, dash = BASELINE_STYLES[i % len(BASELINE_STYLES)]
                _line(ax, bs, bv, color=bcolor, label=f"{b.name} (baseline)", linestyle=dash)
                curves.append(bv)
            if base_ce:
                ax.legend(loc="upper right")
        log_if_wide(ax, *curves)
        ax.set_title("total (weighted)" if panel == "total" else panel)
        _steps_axis(ax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Training loss per term", fontsize=11)
    smoothed = _smooth(run.series("loss")[1]) is not None
    caption = (
        "Each loss term as logged"
        + (" (light) under its moving average (solid)" if smoothed else "")
        + "; a log axis where a term spans over 100×."
    )
    if base_ce:
        caption += " Dashed: the baseline runs' CE loss on their own batches."
    return Plot("losses", "Training loss per term", caption, png(fig))


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
    fig = new_figure(3.6)
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
    teacher = number(((summary or {}).get("teacher_eval") or {}).get(key))
    if math.isfinite(teacher):
        ax.axhline(teacher, color="#888888", linestyle=":", linewidth=1.2, label="teacher")
        curves.append([teacher])
    log_if_wide(ax, *curves)
    _steps_axis(ax)
    ax.set_ylabel(label)
    ax.set_title(f"Held-out {label} during training")
    ax.legend(loc="best")
    caption = (
        "The run's eval split, scored every train.eval_every steps"
        + (", beside the baseline runs" if baselines else "")
        + ("; dotted: the teacher on the same split." if math.isfinite(teacher) else ".")
    )
    return Plot("eval", f"Held-out {label} during training", caption, png(fig))


def _plot_weights(run: RunLog, colors: dict[str, str]) -> Plot | None:
    keys = run.keys("w/")
    # Static weights draw flat lines that say nothing: the plot is for weights that move.
    if not any(len({v for v in run.series(k)[1] if math.isfinite(v)}) > 1 for k in keys):
        return None
    fig = new_figure(3.2)
    ax = fig.subplots()
    for k in keys:
        steps, values = run.series(k)
        name = k[len("w/") :]
        ax.plot(
            steps,
            values,
            color=colors.get(name, PALETTE[0]),
            label=name,
            marker="o" if len(steps) < 10 else None,
            markersize=3.5,
        )
    _steps_axis(ax)
    ax.set_ylabel("weight")
    ax.set_title("Loss weights over training")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return Plot(
        "weights",
        "Loss weights over training",
        "The weight of each term at each step (set by the weighting strategy and any weight schedule).",
        png(fig),
    )


def _plot_schedules(run: RunLog, colors: dict[str, str]) -> Plot | None:
    temps = run.keys("temperature/")
    logged = set(run.keys(""))
    panels = [p for p in ("lr", "temperature", "grad_norm") if (temps if p == "temperature" else p in logged)]
    if not panels:
        return None
    fig = new_figure(2.8)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=True):
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
                ax.plot(
                    steps,
                    values,
                    color=colors.get(name, PALETTE[0]),
                    label=name,
                    marker="o" if few else None,
                    markersize=3.5,
                )
            ax.legend(loc="best")
            ax.set_title("temperature")
        else:
            steps, values = run.series("grad_norm")
            _line(ax, steps, values, color="#555555")
            log_if_wide(ax, values)
            ax.set_title("gradient norm (before clipping)")
        _steps_axis(ax)
    shown = {
        "lr": "the learning rate",
        "temperature": "the scheduled temperatures",
        "grad_norm": "the gradient norm before clipping",
    }
    names = [shown[p] for p in panels]
    caption = (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]).capitalize() + "."
    return Plot("schedules", "Learning rate, temperatures and gradient norm", caption, png(fig))


def plots(run: RunLog, baselines: list[RunLog], summary: dict | None) -> tuple[list[Plot], list[Plot]]:
    """(training curves, weights and schedules)."""
    import matplotlib

    colors = _term_colors([k[len("loss/") :] for k in run.keys("loss/")] + ["ce"])
    with matplotlib.rc_context(STYLE):
        curves = [_plot_losses(run, baselines, colors), _plot_eval(run, baselines, summary)]
        schedules = [_plot_weights(run, colors), _plot_schedules(run, colors)]
    return [p for p in curves if p], [p for p in schedules if p]
