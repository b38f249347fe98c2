"""The one metric catalogue: what ``eval.json`` holds, how each number is shown, which way is better.

``alignkd eval``'s table, the report's tables and the demo's headline are all
derived from :data:`METRICS`, and the retention ``alignkd eval`` works out
follows each metric's :class:`Kept`. A metric added here appears everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Better = Literal["higher", "lower"] | None


# ----------------------------------------------------------------------------- formats


def fixed(n: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{n}f}"


def percent(v: float) -> str:
    return f"{100 * v:.1f}%"


def points(v: float) -> str:
    """A difference of two accuracies, in percentage points."""
    return f"{100 * v:+.1f} pts"


def count(v: float) -> str:
    return f"{round(v):,}"


def millions(v: float) -> str:
    return f"{v / 1e6:.2f}M"


def times(v: float) -> str:
    return f"{v:.2f}×"


def general(v: float) -> str:
    return f"{v:.4g}"


def number(v) -> float:
    """``v`` as a float; NaN for anything that is not a number (None, a bool, a string)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def shown(v, fmt: Callable[[float], str]) -> str:
    """A cell: "—" when not measured (None or absent), yes/no for a flag, "nan" when not finite, else ``fmt``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return fmt(number(v)) if math.isfinite(number(v)) else "nan"


# ----------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Kept:
    """How a metric compares with the teacher's: its entry in ``eval.json``'s ``retention``."""

    key: str
    """Key in ``retention[model]``."""
    label: str
    ratio: Literal["model/teacher", "teacher/model"]
    """model/teacher for higher-is-better scores and sizes; teacher/model for lower-is-better scores and speed-ups."""
    fmt: Callable[[float], str] = percent
    better: Better = "higher"


@dataclass(frozen=True)
class Metric:
    """One number ``alignkd eval`` writes per model."""

    key: str
    """Key in ``eval.json``'s ``models[name].metrics``."""
    label: str
    better: Better
    """Which way is better; None for counts and settings (never the best of a row)."""
    fmt: Callable[[float], str]
    kept: Kept | None = None
    """Its comparison with the teacher, when it has one."""
    fidelity: bool = False
    """Scored against the teacher's own generations (how closely a model imitates it)."""


def _generation(key: str, label: str, fmt: Callable[[float], str], better: Better) -> tuple[Metric, Metric]:
    """A generation metric against the reference text, and the same against the teacher's continuations."""
    ratio = "model/teacher" if better == "higher" else "teacher/model"
    return (
        Metric(key, label, better, fmt, Kept(key, f"{label} retained", ratio)),
        Metric(f"{key}_vs_teacher", f"{label} vs teacher", better, fmt, fidelity=True),
    )


_GENERATION = [
    _generation("bleu", "BLEU", fixed(1), "higher"),
    _generation("rouge1", "ROUGE-1", fixed(3), "higher"),
    _generation("rouge2", "ROUGE-2", fixed(3), "higher"),
    _generation("rougeL", "ROUGE-L", fixed(3), "higher"),
    _generation("cer", "CER", fixed(3), "lower"),
]

METRICS: tuple[Metric, ...] = (
    Metric("perplexity", "Perplexity", "lower", fixed(2), Kept("perplexity", "Perplexity retained", "teacher/model")),
    # Per byte and per character of the scored text: comparable between models with different tokenizers.
    Metric("bits_per_byte", "Bits per byte", "lower", fixed(4)),
    Metric("bits_per_char", "Bits per character", "lower", fixed(4)),
    Metric("ppl_tokens_scored", "Tokens scored (perplexity)", None, count),
    Metric("bos", "Tokenizer adds BOS", None, general),  # a bool: shown as yes or no
    Metric("accuracy", "Accuracy", "higher", percent, Kept("accuracy", "Accuracy retained", "model/teacher")),
    # Accuracy minus chance: its model/teacher ratio is the retention above chance,
    # (model - chance) / (teacher - chance), which a teacher near chance cannot inflate.
    Metric(
        "accuracy_above_chance",
        "Accuracy above chance",
        "higher",
        points,
        Kept("accuracy_above_chance", "Accuracy retained above chance", "model/teacher"),
    ),
    Metric("accuracy_chance", "Chance accuracy (majority class)", None, percent),
    Metric("accuracy_examples", "Examples (accuracy)", None, count),
    *(score for score, _ in _GENERATION),
    Metric(
        "prefill_ms_per_token",
        "Prefill ms/token",
        "lower",
        fixed(2),
        Kept("prefill_speedup", "Prefill speed-up", "teacher/model", times),
    ),
    Metric(
        "decode_ms_per_token",
        "Decode ms/token",
        "lower",
        fixed(2),
        Kept("decode_speedup", "Decode speed-up", "teacher/model", times),
    ),
    Metric("prefill_tokens_per_s", "Prefill tokens/s", "higher", fixed(0)),
    Metric("decode_tokens_per_s", "Decode tokens/s", "higher", fixed(0)),
    # Parameters and size are costs: fewer is better, and the share of the teacher's is model/teacher.
    Metric(
        "params",
        "Parameters",
        "lower",
        millions,
        Kept("params", "Parameters (share of teacher)", "model/teacher", better="lower"),
    ),
    Metric("non_embedding_params", "Non-embedding parameters", "lower", millions),
    Metric("size_mb", "Size (MB)", "lower", fixed(1)),
    *(fidelity for _, fidelity in _GENERATION),
    # A run's own generation metrics (generation.eval_prompts, alignkd.engine.judge), on token ids.
    Metric("gen_rougeL", "Greedy ROUGE-L vs teacher", "higher", fixed(3)),
    Metric("gen_teacher_nll", "Teacher-judged NLL of samples", "lower", fixed(3)),
    Metric("gen_distinct2", "Distinct-2 of samples", "higher", fixed(3)),
)
"""Every metric, in the order tables show them: scores, costs, then fidelity to the teacher."""

BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}
KEPT: tuple[Kept, ...] = tuple(m.kept for m in METRICS if m.kept)
"""The retention entries, in table order."""
GENERATION_KEYS: tuple[str, ...] = tuple(score.key for score, _ in _GENERATION)


def retention(teacher_metrics: dict, metrics: dict) -> dict:
    """What a model kept of the teacher, one entry per :class:`Kept`: 1.0 is all of it.

    Higher-is-better scores give model/teacher, lower-is-better ones
    (perplexity, CER) teacher/model, latencies the speed-up teacher_ms/model_ms,
    and ``params`` the size ratio model/teacher; accuracy above chance gives
    (model - chance) / (teacher - chance). A metric missing on either side is
    left out; a missing, zero or negative denominator gives None (a teacher at or
    below chance leaves nothing to retain).
    """
    out = {}
    for m in METRICS:
        if m.kept is None or m.key not in teacher_metrics or m.key not in metrics:
            continue
        num, den = metrics[m.key], teacher_metrics[m.key]
        if m.kept.ratio == "teacher/model":
            num, den = den, num
        out[m.kept.key] = None if num is None or den is None or den <= 0 else num / den
    return out


NEAR_CHANCE = 0.15
"""A teacher whose accuracy is less than this above chance gets a warning. With the
demo's 100 examples an accuracy near 60 % has a standard error of about 5 points,
so a smaller margin is within 3 standard errors of chance; the demo's teacher, on
its two balanced classes, is below it."""


def chance_level(labels: list[str]) -> float:
    """The accuracy of always answering the most frequent of ``labels`` (the scored examples' classes)."""
    return max(labels.count(c) for c in set(labels)) / len(labels)


NEAR_CHANCE_WARNING = "the teacher's accuracy"
"""How :func:`near_chance`'s warning begins (the report finds it among ``eval.json``'s warnings by it)."""

TOKENIZERS_DIFFER = (
    "the models' tokenizers differ: perplexity is per token of each model's own tokenizer, so it does not compare "
    "across them; compare bits per byte"
)


def near_chance(teacher_metrics: dict) -> str | None:
    """A one-line warning when the teacher's accuracy is within :data:`NEAR_CHANCE` of chance, else None."""
    acc, chance = number(teacher_metrics.get("accuracy")), number(teacher_metrics.get("accuracy_chance"))
    if not (math.isfinite(acc) and math.isfinite(chance)) or acc - chance >= NEAR_CHANCE:
        return None
    said = f"{NEAR_CHANCE_WARNING} ({percent(acc)}) is"
    base = f"chance ({percent(chance)}: always answering the majority class)"
    if acc <= chance:
        return f"{said} not above {base}, so no share of it means anything; evaluate on a task the teacher does well"
    return (
        f"{said} only {100 * (acc - chance):.1f} points above {base}, so the share of it a model keeps says little; "
        "compare the accuracy above chance, or evaluate on a task the teacher does well"
    )
