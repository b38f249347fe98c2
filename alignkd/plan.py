"""Resolving the configured loss terms against the two models.

From the config and the models this decides which blocks meet, what each model
must expose (``Needs``), and which projectors and adaptive mixtures are trained
beside the student (``StudentSide``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from alignkd.align import AdaptiveMix, LayerMapError, Projector, resolve_map
from alignkd.capture import Capture, Needs, Record
from alignkd.config import ConfigError, LossConfig
from alignkd.families import blocks_of, family_of, get_path, hidden_size_of, num_heads_of
from alignkd.terms import Term

FEATURE_TYPES = ("hidden", "attention", "relation", "contrastive", "blockwise")
PROJECTED_TYPES = ("hidden", "contrastive", "blockwise")


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Record:
        """Student forward: ``[B, T]`` ids and mask -> Record of logits and captured tensors."""
        out = self.student(input_ids=input_ids, attention_mask=attention_mask.long())
        rec = self.capture.take()
        rec.logits = out.logits
        return rec

    def projector(self, name: str, block: int) -> nn.Module | None:
        key = _key(name, block)
        return self.projectors[key] if key in self.projectors else None

    def mix(self, name: str) -> AdaptiveMix | None:
        key = _key(name)
        return self.mixes[key] if key in self.mixes else None

    def aux_state(self) -> dict[str, torch.Tensor]:
        """Projector and mixture weights (saved with the run, never inside the student)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}


@dataclass
class Plan:
    terms: list[Term]
    student_needs: Needs
    teacher_needs: Needs
    projectors: dict[str, nn.Module]
    mixes: dict[str, nn.Module]
    needs_eager_attention: bool


def _qkv_width(model: nn.Module, part: str) -> int:
    fam = family_of(model)
    block = blocks_of(model)[0]
    if isinstance(fam.qkv, str):  # fused q/k/v (GPT-2): three equal parts of the model width
        return hidden_size_of(model)
    return get_path(block, fam.qkv["qkv".index(part)]).weight.shape[0]


def _relation_heads(cfg: LossConfig, student: nn.Module, teacher: nn.Module, where: str) -> int:
    widths = [_qkv_width(m, p) for m in (student, teacher) for p in cfg.of]
    if cfg.num_relation_heads is not None:
        h = cfg.num_relation_heads
        bad = [w for w in widths if w % h]
        if bad:
            raise ConfigError(f"{where}.num_relation_heads: {h} does not divide the projection width {bad[0]}; pick a divisor of {math.gcd(*widths)}")
        return h
    # Default: the most heads, up to the student's attention heads, that split every width.
    for h in range(num_heads_of(student), 0, -1):
        if all(w % h == 0 for w in widths):
            return h
    return 1


def build_plan(losses: list[LossConfig], student: nn.Module, teacher: nn.Module) -> Plan:
    ls, lt = len(blocks_of(student)), len(blocks_of(teacher))
    ds, dt = hidden_size_of(student), hidden_size_of(teacher)
    s_needs, t_needs = Needs(), Needs()
    projectors: dict[str, nn.Module] = {}
    mixes: dict[str, nn.Module] = {}
    terms: list[Term] = []
    eager = False
    for i, cfg in enumerate(losses):
        where = f"losses[{i}]"
        if cfg.type not in FEATURE_TYPES:
            terms.append(Term(cfg=cfg, pairs=[], temperature=cfg.temperature))
            continue
        try:
            pairs = resolve_map(cfg.layers, ls, lt, f"{where}.layers", getattr(student, "alignkd_source_layers", None))
        except LayerMapError as e:
            raise ConfigError(str(e)) from None
        term = Term(cfg=cfg, pairs=pairs, temperature=cfg.temperature)
        if cfg.type in ("hidden", "contrastive", "blockwise"):
            s_needs.hidden.update(s for s, _ in pairs)
            if cfg.type != "blockwise":
                t_needs.hidden.update(range(lt) if cfg.layers == "adaptive" else (t for _, t in pairs))
            if ds != dt:
                for s, _ in pairs:
                    projectors[_key(cfg.name, s)] = Projector(ds, dt, norm=cfg.projector == "linear_norm")
            if cfg.layers == "adaptive":
                mixes[_key(cfg.name)] = AdaptiveMix([t for _, t in pairs], lt)
        elif cfg.type == "attention":
            s_needs.attention.update(s for s, _ in pairs)
            t_needs.attention.update(t for _, t in pairs)
            eager = True
        elif cfg.type == "relation":
            for s, t in pairs:
                for part in cfg.of:
                    s_needs.qkv.add((s, part))
                    t_needs.qkv.add((t, part))
            term.relation_heads = _relation_heads(cfg, student, teacher, where)
        terms.append(term)
    return Plan(terms, s_needs, t_needs, projectors, mixes, eager)
