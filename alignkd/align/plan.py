"""Resolving the configured loss terms against the two models.

From the config and the models this decides which blocks meet, what each model
must expose (``Needs``), and which projectors and adaptive mixtures are trained
beside the student (``StudentSide``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignkd.align.maps import AdaptiveMix, LayerMapError, Projector, resolve_map
from alignkd.errors import ConfigError
from alignkd.models.capture import Capture, Needs, Record
from alignkd.models.families import OutputHead, blocks_of, hidden_size_of
from alignkd.terms import TERM_TYPES, Term, TermConfig


def _key(name: str, block: int | None = None) -> str:
    # ModuleDict keys may not contain dots.
    base = name.replace(".", "_")
    return base if block is None else f"{base}__{block}"


class StudentSide(nn.Module):
    """The trainable side: the student plus projectors and adaptive layer mixtures."""

    def __init__(self, student: nn.Module, needs: Needs, projectors: dict[str, nn.Module], mixes: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.projectors = nn.ModuleDict(projectors)
        self.mixes = nn.ModuleDict(mixes)
        self.capture = Capture(student, needs)
        self.head: OutputHead | None = None
        """The student's output head when the output terms read it fused (no logits): the forward then stops
        at the final norm. Set once at set-up; the run's one record of whether the LM head is fused."""

    @property
    def fused(self) -> bool:
        return self.head is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Record:
        """Student forward: ``[B, T]`` ids and mask -> Record of logits (or final hidden states) and captured
        tensors."""
        return forward_record(self.student, self.capture, input_ids, attention_mask, self.fused)

    def projector(self, name: str, block: int | None) -> nn.Module | None:
        return self.projectors[key] if (key := _key(name, block)) in self.projectors else None

    def mix(self, name: str) -> AdaptiveMix | None:
        return self.mixes[key] if (key := _key(name)) in self.mixes else None

    def aux_state(self) -> dict[str, torch.Tensor]:
        """Projector and mixture weights (saved with the run, never inside the student)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}


def unwrap(side: nn.Module) -> StudentSide:
    """The ``StudentSide`` inside DDP's or DeepSpeed's wrapper (each holds it as ``.module``).

    Accelerate's ``unwrap_model`` would do, but it imports deepspeed whenever it is
    installed: seconds per process, and a warning on stdout.
    """
    while not isinstance(side, StudentSide):
        side = side.module
    return side


def forward_record(
    model: nn.Module, capture: Capture, input_ids: torch.Tensor, attention_mask: torch.Tensor, fused_head: bool
) -> Record:
    """One model's forward as a Record: its logits, or with ``fused_head`` its final hidden states (no head call)."""
    if fused_head:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask.long())
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask.long())
    rec = capture.take()
    if fused_head:
        rec.final_hidden = out[0]
    else:
        rec.logits = out.logits
    return rec


@dataclass
class TermPlan:
    terms: list[Term]
    student_needs: Needs
    teacher_needs: Needs
    projectors: dict[str, nn.Module]
    mixes: dict[str, nn.Module]
    needs_eager_attention: bool


def build_plan(losses: list[TermConfig], student: nn.Module, teacher: nn.Module) -> TermPlan:
    """Resolve each term's layer map and ask its type what to capture and which projectors to train."""
    ls, lt = len(blocks_of(student)), len(blocks_of(teacher))
    ds, dt = hidden_size_of(student), hidden_size_of(teacher)
    s_needs, t_needs = Needs(), Needs()
    projectors: dict[str, nn.Module] = {}
    mixes: dict[str, nn.Module] = {}
    terms: list[Term] = []
    eager = False
    for i, cfg in enumerate(losses):
        where = f"losses[{i}]"
        kind = TERM_TYPES[cfg.type]
        pairs: list[tuple[int, int]] = []
        if kind.layered:
            try:
                pairs = resolve_map(
                    cfg.layers, ls, lt, f"{where}.layers", getattr(student, "alignkd_source_layers", None)
                )
            except LayerMapError as e:
                raise ConfigError(str(e)) from None
        if kind.needs is not None:
            s, t = kind.needs(cfg, pairs, lt)
            s_needs.merge(s)
            t_needs.merge(t)
        if kind.projected and ds != dt:
            if cfg.projector == "none":
                raise ConfigError(
                    f"{where}.projector: none, but the student is {ds} wide and the teacher {dt}; "
                    "set projector: linear to learn a projection, or give the student the teacher's width"
                )
            # A term without a layer map (embedding) has one projector, keyed by its name alone.
            for s_block in [s for s, _ in pairs] if kind.layered else [None]:
                projectors[_key(cfg.name, s_block)] = Projector(ds, dt, norm=cfg.projector == "linear_norm")
        if kind.layered and cfg.layers == "adaptive":
            mixes[_key(cfg.name)] = AdaptiveMix([t for _, t in pairs], lt)
        eager |= kind.eager_attention
        params = kind.prepare(cfg, student, teacher, where) if kind.prepare is not None else {}
        terms.append(Term(cfg=cfg, pairs=pairs, params=params))
    return TermPlan(terms, s_needs, t_needs, projectors, mixes, eager)
