"""Which teacher blocks a depth-pruned student keeps, chosen by measurement on calibration text.

``student.from_teacher.select`` names the rule; n is the teacher's block count,
k the kept count, and h_l the input of block l (h_{l+1} its output):

- ``even``: k blocks spread evenly from the first to the last (no measurement).
- ``importance``: keep the k blocks that change their input most, by Block
  Influence BI_l = 1 - cos(h_l, h_{l+1}) averaged over real tokens (Men et al.
  2024, ShortGPT). With ``contiguous``, remove instead the one span of n - k
  blocks whose input and output are closest by angular distance
  arccos(cos(h_l, h_{l+n-k})) / pi (Gromov et al. 2024; averaged over every
  real token here, where they read the last token only).
- ``perplexity``: keep the k blocks whose removal alone raises the teacher's
  loss on the calibration text most; with ``contiguous``, remove the span of
  n - k blocks whose removal raises it least.
- ``search``: the candidate sets of :data:`RULES`, in order, scored by a short
  distillation probe each (the caller's ``probe``); the lowest probe loss wins.

Cost on C calibration sequences: the state scores take one teacher forward
over them (hooks on every block, the head skipped); ``perplexity`` one forward
per block (n + 1 in all), or per span (k + 2); ``search`` what its candidates
need, plus its probes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from alignkd.align.tasks import Batch, heldout
from alignkd.checks import one_of
from alignkd.errors import ConfigError
from alignkd.models.capture import Capture, Needs
from alignkd.models.depth import even_layers
from alignkd.models.families import blocks_of
from alignkd.models.student import depth_pruned, kept_count

if TYPE_CHECKING:
    from alignkd.config import FromTeacherConfig, StudentConfig

SELECTIONS = ("even", "importance", "perplexity", "search")
"""The values of ``student.from_teacher.select``."""


@dataclass
class Calibration:
    """The text the blocks are measured on, and how to run a model over it."""

    data: dict[str, torch.Tensor]
    """Task rows: ``input_ids`` ``[C, T]`` (and ``mask``, ``labels`` for classification)."""
    task: object
    """The task object (``align.tasks``): batches and the loss."""
    tokenizer: object
    skip_bos: bool
    """Leave a leading BOS out of the state scores: its states are outliers that say nothing of the block."""
    batch_size: int
    device: torch.device | str = "cpu"
    autocast: Callable = contextlib.nullcontext

    @property
    def sequences(self) -> int:
        return self.data["input_ids"].shape[0]

    def batches(self) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Each batch on the device, with the ``[B, T]`` bool mask of the tokens the state scores average over."""
        for i, start in enumerate(range(0, self.sequences, self.batch_size)):
            idx = torch.arange(start, min(start + self.batch_size, self.sequences))
            b = self.task.make_batch(self.data, idx, self.tokenizer, seed=10_000 + i)
            b = Batch(
                b.input_ids.to(self.device),
                b.mask.to(self.device),
                b.labels.to(self.device) if b.labels is not None else None,
            )
            counted = self.task.feature_mask(b, self.skip_bos)
            yield b, b.mask if counted is None else counted


def calibration_rows(data: dict[str, torch.Tensor], count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` rows of ``data`` drawn by ``seed`` (every row when it has fewer), in their stored order."""
    n = data["input_ids"].shape[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return {k: v[idx] for k, v in data.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` x2 -> ``[...]`` cosine similarity, in float32."""
    return nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@torch.no_grad()
def state_scores(teacher: nn.Module, calib: Calibration, span: int) -> tuple[list[float], list[float]]:
    """Block influence ``[n]`` and the angular distance across every span of ``span`` blocks ``[n - span + 1]``.

    One forward of the base model (no head) over the calibration text; both are
    means over the counted tokens of every sequence. ``span`` 0 gives no distances.
    """
    blocks = blocks_of(teacher)
    n = len(blocks)
    capture = Capture(teacher, Needs(hidden=set(range(n))))  # the output of every block
    entry: list[torch.Tensor] = []

    def first_input(module, args, kwargs):
        entry.append(args[0] if args else kwargs["hidden_states"])

    handle = blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)
    starts = n - span + 1 if span > 0 else 0
    influence = torch.zeros(n, dtype=torch.float64)
    angle = torch.zeros(starts, dtype=torch.float64)
    count = 0
    try:
        for batch, m in calib.batches():
            with calib.autocast():
                teacher.base_model(input_ids=batch.input_ids, attention_mask=batch.mask.long())
            rec = capture.take()
            h = [entry.pop()] + [rec.hidden[i] for i in range(n)]  # h[l]: input of block l
            influence += torch.stack([(1 - cosine(h[i], h[i + 1]))[m].double().sum().cpu() for i in range(n)])
            for i in range(starts):
                angle[i] += (torch.arccos(cosine(h[i], h[i + span]).clamp(-1, 1)) / math.pi)[m].double().sum().cpu()
            count += int(m.sum())
    finally:
        capture.remove()
        handle.remove()
    count = max(count, 1)
    return (influence / count).tolist(), (angle / count).tolist()


def calibration_loss(model: nn.Module, calib: Calibration) -> float:
    """The model's mean loss on the calibration text (next-token, masked-token or class cross-entropy)."""
    batches = math.ceil(calib.sequences / calib.batch_size)
    return heldout(
        calib.task,
        model,
        calib.data,
        calib.tokenizer,
        batch_size=calib.batch_size,
        batches=batches,
        device=calib.device,
        autocast=calib.autocast,
    )["eval_loss"]


def removal_increase(teacher: nn.Module, calib: Calibration, removed: list[int], base: float) -> float:
    """How much removing the blocks ``removed`` raises the calibration loss over ``base`` (the whole teacher's)."""
    n = len(blocks_of(teacher))
    view = depth_pruned(teacher, [i for i in range(n) if i not in removed], None, share_weights=True)
    return calibration_loss(view, calib) - base


class Scores:
    """The measurements of one teacher's blocks, each taken once, when a rule first asks for it."""

    def __init__(self, teacher: nn.Module, calib: Calibration, keep: int):
        self.teacher, self.calib = teacher, calib
        self.n = len(blocks_of(teacher))
        even_layers(self.n, keep)  # a count the teacher cannot give stops here, in one line
        self.k = keep
        self.span = self.n - keep  # the blocks a contiguous removal takes out

    @functools.cached_property
    def _states(self) -> tuple[list[float], list[float]]:
        return state_scores(self.teacher, self.calib, self.span)

    @property
    def influence(self) -> list[float]:
        """``[n]`` Block Influence of each block."""
        return self._states[0]

    @property
    def angular(self) -> list[float]:
        """``[n - span + 1]`` angular distance between the input of block l and the output of block l + span - 1."""
        return self._states[1]

    @functools.cached_property
    def base_loss(self) -> float:
        return calibration_loss(self.teacher, self.calib)

    @functools.cached_property
    def block_removal(self) -> list[float]:
        """``[n]`` loss increase when block l alone is removed."""
        return [removal_increase(self.teacher, self.calib, [i], self.base_loss) for i in range(self.n)]

    @functools.cached_property
    def span_removal(self) -> list[float]:
        """``[n - span + 1]`` loss increase when the span starting at block l is removed."""
        if not self.span:
            return []
        return [
            removal_increase(self.teacher, self.calib, list(range(i, i + self.span)), self.base_loss)
            for i in range(self.k + 1)
        ]

    def keep_top(self, score: list[float]) -> list[int]:
        """The k blocks of highest ``score`` (ties: the earlier block), in order."""
        return sorted(sorted(range(self.n), key=lambda i: (-score[i], i))[: self.k])

    def keep_outside_span(self, score: list[float]) -> list[int]:
        """Every block outside the span of lowest ``score`` (ties: the earlier span)."""
        if not self.span:
            return list(range(self.n))
        start = min(range(len(score)), key=lambda i: (score[i], i))
        return [i for i in range(self.n) if not start <= i < start + self.span]

    def to_dict(self) -> dict:
        """What was measured, for ``block_scores.json``; the measurements no rule asked for are left out."""
        d = {"teacher_blocks": self.n, "kept": self.k, "calibration_sequences": self.calib.sequences}
        cached = vars(self)
        if "_states" in cached:
            d["block_influence"] = self.influence
            d["span_blocks"] = self.span
            d["span_angular_distance"] = self.angular
        if "base_loss" in cached:
            d["calibration_loss"] = self.base_loss
        if "block_removal" in cached:
            d["block_removal_loss_increase"] = self.block_removal
        if "span_removal" in cached:
            d["span_removal_loss_increase"] = self.span_removal
        return d


RULES: dict[str, Callable[[Scores], list[int]]] = {
    "importance": lambda s: s.keep_top(s.influence),
    "importance_span": lambda s: s.keep_outside_span(s.angular),
    "perplexity": lambda s: s.keep_top(s.block_removal),
    "even": lambda s: even_layers(s.n, s.k),
    "perplexity_span": lambda s: s.keep_outside_span(s.span_removal),
}
"""Candidate block sets by name; ``search`` probes them in this order."""


@dataclass
class Selection:
    """The chosen blocks and how they were chosen."""

    layers: list[int]
    """Teacher block indices the student keeps, in order."""
    rule: str
    """The rule of :data:`RULES` that gave them."""
    scores: dict = field(default_factory=dict)
    """Everything measured (``block_scores.json``)."""


def rule_of(ft: FromTeacherConfig) -> str:
    """The rule of :data:`RULES` that ``select`` and ``contiguous`` name (``search`` has none of its own)."""
    return f"{ft.select}_span" if ft.contiguous else ft.select


def choose(
    teacher: nn.Module, calib: Calibration, ft: FromTeacherConfig, probe: Callable[[list[int]], float] | None = None
) -> Selection:
    """Choose the blocks of ``ft`` on ``calib``. The state scores are always measured (one forward), for the record.

    ``probe(layers)`` (``search`` only): the held-out loss after a short
    distillation of a student of those blocks; lower is better.
    """
    s = Scores(teacher, calib, kept_count(len(blocks_of(teacher)), ft.num_layers))
    _ = s.influence  # measured whatever the rule: the record shows it
    if ft.select != "search":
        rule = rule_of(ft)
        layers = RULES[rule](s)
        return Selection(
            layers,
            rule,
            {**s.to_dict(), "select": ft.select, "contiguous": ft.contiguous, "rule": rule, "layers": layers},
        )
    if probe is None:
        raise ValueError("select search needs a probe")
    tried: list[dict] = []
    for name, rule_fn in RULES.items():
        if len(tried) == ft.search_candidates:
            break
        layers = rule_fn(s)
        if any(c["layers"] == layers for c in tried):
            continue  # the same set from another rule: probed once
        loss = probe(layers)
        tried.append({"rule": name, "layers": layers, "probe_loss": loss if math.isfinite(loss) else float("inf")})
    best = min(tried, key=lambda c: c["probe_loss"])  # the first of equals: the order of RULES
    scores = {
        **s.to_dict(),
        "select": "search",
        "probe_steps": ft.search_probe_steps,
        "candidates": tried,
        "rule": best["rule"],
        "layers": best["layers"],
    }
    return Selection(best["layers"], best["rule"], scores)


def write_scores(selection: Selection, folder: str | Path) -> Path:
    """``folder/block_scores.json``: what was measured and what was chosen."""
    path = Path(folder) / "block_scores.json"
    path.write_text(json.dumps(selection.scores, indent=2))
    return path


def check_selection(student: StudentConfig) -> None:
    """One-line ConfigErrors for the selection fields of ``student.from_teacher``."""
    ft, where = student.from_teacher, "student.from_teacher"
    if ft is None:
        return
    other = next((k for k in ("path", "config") if getattr(student, k) is not None), None)
    if other and ft.select != "even":
        raise ConfigError(
            f"{where}.select: choosing blocks applies to a student copied from the teacher, "
            f"and this one comes from student.{other}; keep one of the two"
        )
    one_of(ft.select, SELECTIONS, f"{where}.select")
    if ft.contiguous and rule_of(ft) not in RULES:
        raise ConfigError(f"{where}.contiguous: applies to select importance or perplexity, not {ft.select}; remove it")
    if ft.calibration_sequences < 1:
        raise ConfigError(f"{where}.calibration_sequences: must be >= 1 (default 64)")
    if not 1 <= ft.search_candidates <= len(RULES):
        raise ConfigError(
            f"{where}.search_candidates: must be between 1 and {len(RULES)} (the rules: {', '.join(RULES)})"
        )
    if ft.search_probe_steps < 1:
        raise ConfigError(f"{where}.search_probe_steps: must be >= 1")
