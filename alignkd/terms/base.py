"""What a loss term type is made of, and the tensors a term reads.

A term type is one ``TermType``: its config dataclass (only the fields that apply
to it, their defaults and checks), what it needs captured from each model,
whether it trains a projector, and its function. Config loading, validation,
planning, ``--print-config`` and the generated configuration reference all read these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from alignkd.checks import one_of
from alignkd.errors import ConfigError
from alignkd.models.capture import Capture, Needs, Record

LAYER_MAPS = ("auto", "last", "source", "adaptive")
PROJECTORS = ("linear", "linear_norm", "none")
SCHEDULE_KINDS = ("constant", "warmup", "linear", "cosine", "step")


# ----------------------------------------------------------------------------- configs


@dataclass
class ScheduleConfig:
    """How a loss term's weight multiplier or temperature changes over training."""

    kind: str = "constant"
    """constant (``start``), warmup (0 to ``start`` over ``steps``, then ``start``), linear or cosine
    (``start`` to ``end`` over ``steps``), or step (``start`` for ``steps`` steps, then ``end``: two training stages,
    e.g. feature alignment first, then prediction-layer KD)."""
    start: float = 1.0
    """Value at step 0 (for ``warmup``: the value after the warm-up)."""
    end: float = 1.0
    """Value after ``steps`` steps (linear and cosine)."""
    steps: int | None = None
    """Length of the ramp in optimizer steps (for step: when ``end`` takes over); None means the whole run (for step:
    half of it)."""

    def check(self, where: str) -> None:
        one_of(self.kind, SCHEDULE_KINDS, f"{where}.kind")


@dataclass
class TermConfig:
    """Fields every loss term has; each type adds its own in a subclass."""

    type: str = ""
    """The term type (the key of ``TERM_TYPES``)."""
    weight: float = 1.0
    """Static weight (the initial weight under gradnorm / uncertainty)."""
    name: str | None = None
    """Label in logs and metrics; defaults to the type (with a suffix when a type repeats)."""
    weight_schedule: ScheduleConfig | None = None
    """Multiplier on the weight over training (None: constant 1)."""

    def check(self, where: str) -> None:
        """Raise ConfigError naming the first bad field; subclasses extend it."""
        if self.weight < 0:
            raise ConfigError(f"{where}.weight: must be >= 0")
        if self.weight_schedule is not None:
            self.weight_schedule.check(f"{where}.weight_schedule")


@dataclass
class Tempered:
    """Mixin: a softening temperature, optionally scheduled."""

    temperature: float = 1.0
    """Softening temperature."""
    temperature_schedule: ScheduleConfig | None = None
    """Temperature over training (None: constant ``temperature``)."""

    def check_temperature(self, where: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0")
        ts = self.temperature_schedule
        if ts is not None:
            ts.check(f"{where}.temperature_schedule")
            if ts.kind == "warmup" or min(ts.start, ts.end if ts.kind != "constant" else ts.start) <= 0:
                raise ConfigError(
                    f"{where}.temperature_schedule: temperatures must stay > 0 "
                    "(use constant, linear or cosine with start and end > 0)"
                )


@dataclass
class Layered:
    """Mixin: which student blocks meet which teacher blocks."""

    layers: Any = "auto"
    """Layer map: auto, last, source (a from_teacher student's blocks meet the blocks they were copied from),
    adaptive (hidden only), or explicit [[student, teacher], ...] pairs."""

    def check_layers(self, where: str, adaptive: bool = False) -> None:
        layers = self.layers
        if isinstance(layers, str):
            one_of(layers, LAYER_MAPS, f"{where}.layers")
            if layers == "adaptive" and not adaptive:
                raise ConfigError(
                    f"{where}.layers: adaptive applies to hidden losses only; use auto, last or explicit pairs"
                )
        elif not (
            isinstance(layers, list)
            and layers
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in layers)
        ):
            raise ConfigError(
                f"{where}.layers: use auto, last, source, adaptive, "
                "or a list of [student, teacher] pairs like [[0, 3], [1, 7]]"
            )


@dataclass
class Projected:
    """Mixin: a learned projector from the student's width to the teacher's when they differ."""

    projector: str = "linear"
    """When widths differ: linear, or linear_norm (linear then layer norm); none trains no projector,
    and the widths must then match."""

    def check_projector(self, where: str) -> None:
        one_of(self.projector, PROJECTORS, f"{where}.projector")


# ----------------------------------------------------------------------------- resolved terms


@dataclass
class Term:
    """A configured loss term resolved against the two models."""

    cfg: TermConfig
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """(student block, teacher block) pairs; empty for output-only terms."""
    params: dict[str, Any] = field(default_factory=dict)
    """Values resolved against the models (e.g. relation heads)."""


@dataclass
class StepTensors:
    """Everything a term may read for one micro-batch."""

    input_ids: torch.Tensor
    """``[B, T]`` token ids."""
    mask: torch.Tensor
    """``[B, T]`` bool: the positions the terms count: the real (non-padding) ones, or on generated text those whose
    next token was sampled."""
    labels: torch.Tensor | None
    """Classification: ``[B]`` class ids; masked LM: ``[B, T]`` ids with -100 where not predicted;
    causal LM: None (next token)."""
    task: Any
    """The task object (``alignkd.align.tasks``): which logits count and what they predict."""
    student: Record
    teacher: Record
    vocab: int
    """Logit columns both models share."""
    side: nn.Module
    """The ``StudentSide``: projectors and adaptive mixtures, keyed by term name."""
    teacher_model: nn.Module | None = None
    teacher_capture: Capture | None = None
    feature_mask: torch.Tensor | None = None
    """``[B, T]`` bool: the positions feature terms compare; ``mask`` without a leading BOS, whose
    states are attention-sink outliers (norms far above every other token's) in the models that use one."""

    heads: tuple[Any, Any] | None = None
    """(student, teacher) ``OutputHead`` when the run fuses the LM head: records hold final hidden states,
    not logits."""
    terms: tuple[tuple[Term, float | None], ...] = ()
    """Every term of the step with its temperature at this step: terms that share work find each other here."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Values computed once per micro-batch for several terms (e.g. the KL and CE of one walk over the head)."""
    real: torch.Tensor | None = None
    """``[B, T]`` bool: the real tokens the models attended to, where they differ from ``mask`` (generated text:
    the prompt is real but not counted); None: ``mask``."""

    pair: Any = None
    """The ``alignkd.align.tasks.Pair`` of the batch when the two models have different tokenizers (the teacher's
    own tokens and both sides' spans; ``task.matched`` then holds the ids that spell the same text); else None."""

    def attended(self) -> torch.Tensor:
        """``[B, T]`` bool: the real tokens (the models' attention mask)."""
        return self.mask if self.real is None else self.real

    def features(self) -> torch.Tensor:
        """The positions the state terms (hidden, attention queries, contrastive) count."""
        return self.mask if self.feature_mask is None else self.feature_mask

    def logits(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Student logits, teacher logits (cut to the shared vocabulary; None without a teacher forward)
        and the counted positions."""
        return self.task.logits(self)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth ids aligned with the logits, and which positions have one."""
        return self.task.targets(self)


TermFn = Callable[[Term, StepTensors, "float | None"], torch.Tensor]
"""``(term, tensors, temperature at this step) -> float32 scalar``."""


@dataclass(frozen=True)
class TermType:
    """One loss term type: everything alignkd knows about it."""

    config: type[TermConfig]
    """Its config dataclass: the fields that apply, their defaults, ``check``."""
    compute: TermFn
    """The term's value on one micro-batch; the maths lives in ``alignkd.losses``."""
    matches: str
    """What it matches, for the loss table of the docs."""
    needs: Callable[[Any, list[tuple[int, int]], int], tuple[Needs, Needs]] | None = None
    """``(cfg, pairs, teacher blocks) -> (student needs, teacher needs)``; None: logits only."""
    projected: bool = False
    """Trains a projector per mapped student block when the widths differ."""
    eager_attention: bool = False
    """Needs attention probabilities, so both models switch to eager attention."""
    uses_teacher: bool = True
    """False only for ground-truth terms: a run of those alone never runs the teacher."""
    prepare: Callable[[Any, nn.Module, nn.Module, str], dict[str, Any]] | None = None
    """``(cfg, student, teacher, where) -> params``: values resolved against the models."""
    reads_logits: bool = False
    """Reads the models' output logits."""
    fused: bool = False
    """Can compute from the final hidden states and the output heads instead (no ``[tokens, V]`` logits)."""
    cached: bool = False
    """Can train from a teacher cache (``teacher.cache``): the teacher's top-k log-probabilities and cached states."""

    @property
    def layered(self) -> bool:
        return issubclass(self.config, Layered)

    @property
    def tempered(self) -> bool:
        return issubclass(self.config, Tempered)

    def fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]


def mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).mean()
