"""Terms on intermediate representations: hidden states, attention maps, q/k/v relations, contrastive."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from alignkd import losses as L
from alignkd.engine.capture import Needs
from alignkd.errors import ConfigError
from alignkd.models.families import blocks_of, family_of, get_path, hidden_size_of, num_heads_of
from alignkd.terms.base import Layered, Projected, StepTensors, Tempered, Term, TermConfig, TermType, mean, one_of


def projected(term: Term, x: StepTensors, s_block: int) -> torch.Tensor:
    """The student's output of ``s_block`` ``[B, T, Ds]``, through the term's projector when widths differ: ``[B, T, Dt]``."""
    h = x.student.hidden[s_block]
    proj = x.side.projector(term.cfg.name, s_block)
    return proj(h) if proj is not None else h


def hidden_needs(cfg, pairs: list[tuple[int, int]], teacher_blocks: int) -> tuple[Needs, Needs]:
    """Student block outputs of the pairs; the teacher's of the pairs, or all of them for an adaptive mixture."""
    teacher = range(teacher_blocks) if cfg.layers == "adaptive" else (t for _, t in pairs)
    return Needs(hidden={s for s, _ in pairs}), Needs(hidden=set(teacher))


# ----------------------------------------------------------------------------- hidden


HIDDEN_METRICS: dict[str, Callable] = {
    "mse": L.hidden_mse,
    "cosine": L.hidden_cosine,
    "standardized": L.hidden_standardized_mse,
}


@dataclass
class HiddenConfig(Projected, Layered, TermConfig):
    """Block outputs of mapped layers."""

    type: str = "hidden"

    metric: str = "mse"
    """mse, cosine or standardized (MSE after standardising each feature over the batch's tokens)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where, adaptive=True)
        self.check_projector(where)
        one_of(self.metric, list(HIDDEN_METRICS), f"{where}.metric")


def hidden_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    metric = HIDDEN_METRICS[term.cfg.metric]
    mix = x.side.mix(term.cfg.name)
    if mix is not None:
        teacher_all = [x.teacher.hidden[j] for j in range(mix.logits.shape[1])]
        return mean([metric(projected(term, x, s), mix(i, teacher_all), x.features()) for i, (s, _) in enumerate(term.pairs)])
    return mean([metric(projected(term, x, s), x.teacher.hidden[t], x.features()) for s, t in term.pairs])


# ----------------------------------------------------------------------------- attention


@dataclass
class AttentionConfig(Layered, TermConfig):
    """Attention probabilities of mapped layers (both models switch to eager attention)."""

    type: str = "attention"

    layers: Any = "last"
    """Layer map: auto, last, source, or explicit [[student, teacher], ...] pairs."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where)


def attention_needs(cfg, pairs, teacher_blocks: int) -> tuple[Needs, Needs]:
    return Needs(attention={s for s, _ in pairs}), Needs(attention={t for _, t in pairs})


def attention_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    return mean([L.attention_kl(x.student.attention[s], x.teacher.attention[t], x.features()) for s, t in term.pairs])


# ----------------------------------------------------------------------------- relation


@dataclass
class RelationConfig(Tempered, Layered, TermConfig):
    """MiniLMv2 self-relations of q/k/v projections (works with SDPA and flash attention)."""

    type: str = "relation"

    layers: Any = "last"
    """Layer map: auto, last, source, or explicit [[student, teacher], ...] pairs."""
    of: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    """Which projections to relate (q, k, v)."""
    num_relation_heads: int | None = None
    """Heads to split q/k/v into (default: the most, up to the student's attention heads, that divide every width)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where)
        self.check_temperature(where)
        for part in self.of:
            one_of(part, ("q", "k", "v"), f"{where}.of")
        if self.num_relation_heads is not None and self.num_relation_heads < 1:
            raise ConfigError(f"{where}.num_relation_heads: must be >= 1")


def relation_needs(cfg, pairs, teacher_blocks: int) -> tuple[Needs, Needs]:
    return (
        Needs(qkv={(s, part) for s, _ in pairs for part in cfg.of}),
        Needs(qkv={(t, part) for _, t in pairs for part in cfg.of}),
    )


def _qkv_width(model: nn.Module, part: str) -> int:
    fam = family_of(model)
    block = blocks_of(model)[0]
    if isinstance(fam.qkv, str):  # fused q/k/v (GPT-2): three equal parts of the model width
        return hidden_size_of(model)
    return get_path(block, fam.qkv["qkv".index(part)]).weight.shape[0]


def relation_heads(cfg: RelationConfig, student: nn.Module, teacher: nn.Module, where: str) -> dict:
    """``{"heads": h}``: the configured relation heads, checked to divide every projection width, or the default."""
    widths = [_qkv_width(m, p) for m in (student, teacher) for p in cfg.of]
    if cfg.num_relation_heads is not None:
        h = cfg.num_relation_heads
        bad = [w for w in widths if w % h]
        if bad:
            raise ConfigError(f"{where}.num_relation_heads: {h} does not divide the projection width {bad[0]}; pick a divisor of {math.gcd(*widths)}")
        return {"heads": h}
    for h in range(num_heads_of(student), 0, -1):
        if all(w % h == 0 for w in widths):
            return {"heads": h}
    return {"heads": 1}


def relation_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    # The full mask: a leading BOS stays a key, since the relations' softmax over keys includes the sink.
    return mean(
        [
            L.relation_kl(x.student.qkv[(s, part)], x.teacher.qkv[(t, part)], x.mask, num_relation_heads=term.params["heads"], temperature=temperature)
            for s, t in term.pairs
            for part in term.cfg.of
        ]
    )


# ----------------------------------------------------------------------------- contrastive


@dataclass
class ContrastiveConfig(Projected, Tempered, Layered, TermConfig):
    """InfoNCE between student and teacher token features: each student row must pick its own teacher row."""

    type: str = "contrastive"

    layers: Any = "last"
    """Layer map: auto, last, source, or explicit [[student, teacher], ...] pairs."""
    temperature: float = 0.1
    """Softmax temperature of the similarity scores."""
    symmetric: bool = False
    """Also classify teacher rows among student features."""
    max_tokens: int | None = 4096
    """Sample at most this many positions per step (bounds the N x N scores)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where)
        self.check_temperature(where)
        self.check_projector(where)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"{where}.max_tokens: must be >= 1 (or null for all positions)")


def contrastive_needs(cfg, pairs, teacher_blocks: int) -> tuple[Needs, Needs]:
    return Needs(hidden={s for s, _ in pairs}), Needs(hidden={t for _, t in pairs})


def contrastive_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    c = term.cfg
    return mean(
        [
            L.info_nce(projected(term, x, s), x.teacher.hidden[t], x.features(), temperature=temperature, symmetric=c.symmetric, max_tokens=c.max_tokens)
            for s, t in term.pairs
        ]
    )


HIDDEN = TermType(HiddenConfig, hidden_term, "block outputs through a projector when widths differ", needs=hidden_needs, projected=True)
ATTENTION = TermType(AttentionConfig, attention_term, "attention maps (eager attention is switched on, with a warning)", needs=attention_needs, eager_attention=True)
RELATION = TermType(RelationConfig, relation_term, "MiniLMv2 q/k/v self-relations (works with SDPA/flash)", needs=relation_needs, prepare=relation_heads)
CONTRASTIVE = TermType(ContrastiveConfig, contrastive_term, "InfoNCE between student and teacher token features", needs=contrastive_needs, projected=True)
