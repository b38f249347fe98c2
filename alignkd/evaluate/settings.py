"""What ``alignkd eval`` measures and on how much data, and the check of those settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignkd.errors import EvalError

GROUPS = ("perplexity", "accuracy", "generation", "latency")

Step = Callable[[int, int], None]  # on_step(done, total), for the progress display


@dataclass
class EvalSettings:
    """What ``alignkd eval`` measures and on how much data; the defaults are the CLI's."""

    text: str | None = None
    """Held-out text (file, folder, JSONL/CSV) for perplexity and generation; None: the packaged Moby-Dick."""
    labelled: str | None = None
    """CSV (or JSONL) with ``text`` and ``label`` columns for accuracy; None: the packaged sentiment test split."""
    ppl_tokens: int = 16384
    """Tokens of held-out text scored for perplexity (documents joined with EOS, cut to this)."""
    window: int = 512
    """Sliding-window length for perplexity, in tokens."""
    stride: int = 256
    """How far the window moves; each window scores only the tokens the previous one did not."""
    examples: int = 200
    """Labelled examples scored for accuracy (after the few-shot examples are taken out)."""
    shots: int = 4
    """In-context examples in the prompt of a causal LM (a classifier uses its head)."""
    prompts: int = 16
    """Held-out passages for generation metrics, evenly spaced through the text."""
    new_tokens: int = 32
    """Greedy tokens generated per prompt, and decode steps of the latency measurement."""
    latency_batch: int = 1
    """Batch size of the latency measurement."""
    latency_len: int = 128
    """Prompt length (tokens) of the latency measurement."""
    dtype: str = "auto"
    """Dtype the models are evaluated in: auto (bfloat16 where it is fast on the device, else float32), float32,
    bfloat16 or float16."""
    skip: tuple[str, ...] = ()
    """Metric groups not run: any of perplexity, accuracy, generation, latency."""
    device: str | None = None
    """Device the models run on; None: cuda when available, else cpu."""
    seed: int = 0
    """Seed of the few-shot draw and the order of the scored examples (lm-eval's few-shot draw too)."""
    tasks: tuple[str, ...] = ()
    """lm-eval-harness tasks run on every causal LM (e.g. alignkd_sentiment); empty: none."""
    num_fewshot: int | None = None
    """Few-shot examples in each lm-eval task's prompts; None: each task's own default (eval.json records the count
    used)."""
    limit: int | None = None
    """Documents scored per lm-eval task (the first ones); None: all of them."""
    task_paths: tuple[str, ...] = ()
    """Folders of task YAML files lm-eval indexes besides its own tasks and alignkd's packaged ones."""


def check_settings(s: EvalSettings) -> None:
    """Raise :class:`EvalError` naming the first setting out of range."""
    from alignkd.precision import DTYPE_NAMES

    for name in ("ppl_tokens", "window", "stride", "examples", "prompts", "new_tokens", "latency_batch", "latency_len"):
        if getattr(s, name) < 1:
            raise EvalError(f"{name} is {getattr(s, name)}; it must be at least 1")
    if s.window < 2:
        raise EvalError(f"window is {s.window}; a window needs at least 2 tokens to score one")
    if s.stride > s.window:
        raise EvalError(
            f"stride {s.stride} is longer than window {s.window}; tokens would go unscored, use stride <= window"
        )
    if s.shots < 0:
        raise EvalError(f"shots is {s.shots}; it must be 0 or more")
    if s.num_fewshot is not None and s.num_fewshot < 0:
        raise EvalError(f"num_fewshot is {s.num_fewshot}; it must be 0 or more")
    if s.limit is not None and s.limit < 1:
        raise EvalError(f"limit is {s.limit}; it must be at least 1 document")
    if s.dtype not in ("auto", *DTYPE_NAMES):
        raise EvalError(f"dtype {s.dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    bad = [g for g in s.skip if g not in GROUPS]
    if bad:
        raise EvalError(f"cannot skip {bad[0]!r}; the groups are {', '.join(GROUPS)}")
