"""The report's opening paragraph: sizes, perplexities, retention and speed-up, training length."""

from __future__ import annotations

import math

from alignkd.evaluate.catalogue import NEAR_CHANCE_WARNING, fixed, millions, number, percent, times
from alignkd.report.evaluation import fmt_or_nan, model_order, warnings_of
from alignkd.report.runlog import RunLog, finite, first_finite, last_finite


def headline(run: RunLog, summary: dict | None, ev: dict | None, baselines: list[RunLog]) -> str:
    """One paragraph: sizes, perplexities, retention and speed-up, training length."""
    metrics = _model_metrics(ev)
    summary = summary or {}
    out = []
    size = _size_sentence(metrics, summary)
    if size:
        out.append(size)
    perplexity = _perplexity_sentence(metrics, summary, run, baselines)
    if perplexity:
        out.append(perplexity)
    out.extend(_retention_sentences(ev))
    out.append(_training_sentence(run, summary))
    if baselines:
        out.append("Baseline runs drawn for comparison: " + ", ".join(f"{b.name} ({b.path})" for b in baselines) + ".")
    return " ".join(out)


def _model_metrics(ev: dict | None) -> dict:
    """Returns each evaluated model's metrics dict, by model name ({} without an eval.json)."""
    if ev and isinstance(ev.get("models"), dict):
        return {
            n: m.get("metrics", {})
            for n, m in ev["models"].items()
            if isinstance(m, dict) and isinstance(m.get("metrics"), dict)
        }
    return {}


def _size_sentence(metrics: dict, summary: dict) -> str | None:
    """Returns the sentence comparing student and teacher parameter counts, or None if either is unknown."""
    tp = number(metrics.get("teacher", {}).get("params", summary.get("teacher_params")))
    sp = number(metrics.get("student", {}).get("params", summary.get("student_params")))
    if not (math.isfinite(tp) and math.isfinite(sp) and tp > 0):
        return None
    change = "fewer" if sp <= tp else "more"
    return (
        f"The student has {millions(sp)} parameters against the teacher's {millions(tp)} "
        f"({abs(1 - sp / tp):.1%} {change})."
    )


def _perplexity_sentence(metrics: dict, summary: dict, run: RunLog, baselines: list[RunLog]) -> str | None:
    """Returns the held-out perplexity sentence, else the run's eval-split one, else None."""
    ppl = {n: m["perplexity"] for n, m in metrics.items() if "perplexity" in m}
    if ppl:
        shown = ", ".join(f"{n} {fmt_or_nan(ppl[n], fixed(2))}" for n in model_order(list(ppl)))
        return f"Held-out perplexity: {shown}."
    ev_ppl = _eval_split_perplexities(summary, run, baselines)
    if not ev_ppl:
        return None
    return (
        "Eval-split perplexity at the end of training: "
        + ", ".join(f"{n} {fmt_or_nan(v, fixed(2))}" for n, v in ev_ppl.items())
        + "."
    )


def _eval_split_perplexities(summary: dict, run: RunLog, baselines: list[RunLog]) -> dict:
    """Returns the last finite eval-split perplexity of the teacher, student and each baseline that has one."""
    # Without an eval.json the only perplexities are those the run itself scored on its eval split,
    # the teacher's before training and the student's (and baselines') after.
    ev_ppl = {}
    if isinstance(summary.get("teacher_eval"), dict) and "eval_ppl" in summary["teacher_eval"]:
        ev_ppl["teacher"] = summary["teacher_eval"]["eval_ppl"]
    last = last_finite(run.series("eval_ppl", "eval")[1])
    if last is not None:
        ev_ppl["student"] = last
    for b in baselines:
        v = last_finite(b.series("eval_ppl", "eval")[1])
        if v is not None:
            ev_ppl[b.name] = v
    return ev_ppl


def _retention_sentences(ev: dict | None) -> list[str]:
    """Returns the sentences on what the student keeps of the teacher and how much faster it is."""
    ret = (ev or {}).get("retention")
    if not (isinstance(ret, dict) and ret):
        return []
    name = (
        "student"
        if isinstance(ret.get("student"), dict)
        else next((n for n, r in ret.items() if isinstance(r, dict)), None)
    )
    r = ret.get(name, {}) if name else {}
    out = []
    kept, fast = _retention_shares(r)
    if kept:
        out.append(
            f"What the {name} keeps of the teacher: {', '.join(kept)}"
            + (f"; it is {' and '.join(fast)}." if fast else ".")
        )
    elif fast:
        out.append(f"The {name} is {' and '.join(fast)} than the teacher.")
    if any(w.startswith(NEAR_CHANCE_WARNING) for w in warnings_of(ev)):
        out.append(
            "The teacher's accuracy is near chance, so accuracy retention says little (see Retention and speed-up)."
        )
    return out


def _retention_shares(r: dict) -> tuple[list[str], list[str]]:
    """Returns the phrases for the finite quality shares kept and the finite speed-ups, in display order."""
    # Shares of the teacher's score only; a score against references (BLEU, ROUGE) says how close the two models'
    # texts are, which the tables show as fidelity, not as something kept.
    shares = (
        ("perplexity", "perplexity {} (the teacher's over the student's: lower is better)"),
        ("accuracy", "accuracy {}"),
        ("accuracy_above_chance", "accuracy above chance {}"),
    )
    kept = [label.format(percent(number(r[k]))) for k, label in shares if finite(r.get(k))]
    fast = [
        f"{times(number(r[k]))} faster at {kind}"
        for k, kind in (("prefill_speedup", "prefill"), ("decode_speedup", "decoding"))
        if finite(r.get(k))
    ]
    return kept, fast


def _training_sentence(run: RunLog, summary: dict) -> str:
    """Returns the sentence on training length, time and loss (or that no steps were logged)."""
    if not run.train:
        return "The run logged no training steps."
    _, loss = run.series("loss")
    first, last = first_finite(loss), last_finite(loss)
    text = f"Trained {int(run.train[-1]['step'])} steps"
    if finite(summary.get("train_seconds")):
        text += f" in {duration(number(summary['train_seconds']))}"
    if first is not None and last is not None:
        text += f"; total loss {first:.4g} → {last:.4g}"
    return text + "."


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
