"""Terms on intermediate representations: hidden states, input embeddings, attention maps, q/k/v relations,
contrastive."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from alignkd import losses as L
from alignkd.checks import one_of
from alignkd.errors import ConfigError
from alignkd.models.capture import Needs
from alignkd.models.families import blocks_of, family_of, final_norm_of, get_path, hidden_size_of, num_heads_of
from alignkd.terms.base import Layered, Projected, StepTensors, Tempered, Term, TermConfig, TermType, mean


def projected(term: Term, x: StepTensors, s_block: int | None, h: torch.Tensor | None = None) -> torch.Tensor:
    """The student's output of ``s_block`` (or ``h``) ``[B, T, Ds]``, through the term's projector when widths differ:
    ``[B, T, Dt]``.

    ``s_block`` None: the term's one projector (a term without a layer map).
    """
    h = x.student.hidden[s_block] if h is None else h
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
    """mse, cosine (1 - cosine similarity per position) or standardized (MSE after standardising each position's feature
    vector)."""
    final_norm: bool = False
    """Compare post-norm states: each model's final norm (the one before its LM head) applied to its own block outputs,
    the student's before its projector (Minitron)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where, adaptive=True)
        self.check_projector(where)
        one_of(self.metric, list(HIDDEN_METRICS), f"{where}.metric")


def hidden_norms(cfg: HiddenConfig, student: nn.Module, teacher: nn.Module, where: str) -> dict:
    """``{"norms": (student's, teacher's)}`` final norm modules when ``final_norm`` is set, else ``{}``."""
    if not cfg.final_norm:
        return {}
    norms = (final_norm_of(student), final_norm_of(teacher))
    for role, model, norm in zip(("student", "teacher"), (student, teacher), norms, strict=True):
        if norm is None:
            raise ConfigError(
                f"{where}.final_norm: the {role} ({model.config.model_type}) has no final norm; set final_norm: false"
            )
        if any(p.is_meta for p in norm.parameters()):
            raise ConfigError(
                f"{where}.final_norm: the {role}'s final norm is not loaded (teacher.cache); "
                "set final_norm: false or remove teacher.cache"
            )
    return {"norms": norms}


def hidden_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    metric = HIDDEN_METRICS[term.cfg.metric]
    s_norm, t_norm = term.params.get("norms", (None, None))

    def student(s: int) -> torch.Tensor:
        h = x.student.hidden[s]
        return projected(term, x, s, s_norm(h) if s_norm is not None else h)

    def teacher(t: int) -> torch.Tensor:
        h = x.teacher.hidden[t]
        if t_norm is None:
            return h
        with torch.no_grad():  # the teacher is frozen: no graph through its norm
            return t_norm(h)

    mix = x.side.mix(term.cfg.name)
    if mix is not None:
        teacher_all = [teacher(j) for j in range(mix.logits.shape[1])]
        return mean([metric(student(s), mix(i, teacher_all), x.features()) for i, (s, _) in enumerate(term.pairs)])
    return mean([metric(student(s), teacher(t), x.features()) for s, t in term.pairs])


# ----------------------------------------------------------------------------- embedding


@dataclass
class EmbeddingConfig(Projected, TermConfig):
    """Outputs of the input embedding layers (token vectors before the first block)."""

    type: str = "embedding"

    metric: str = "mse"
    """mse, cosine or standardized, as for ``hidden``."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_projector(where)
        one_of(self.metric, list(HIDDEN_METRICS), f"{where}.metric")


def embedding_modules(cfg: EmbeddingConfig, student: nn.Module, teacher: nn.Module, where: str) -> dict:
    """``{"embeddings": (student's, teacher's)}`` input embedding modules."""
    return {"embeddings": (student.get_input_embeddings(), teacher.get_input_embeddings())}


def embedding_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    # A lookup costs next to nothing, so the embeddings are computed here from the ids
    # rather than captured during the forwards. The embedding module's own output: GPT-2's
    # position embeddings and Gemma 1/2's sqrt(D) scale are added later and left out.
    s_emb, t_emb = term.params["embeddings"]
    with torch.no_grad():
        teacher = t_emb(x.input_ids)
    student = projected(term, x, None, s_emb(x.input_ids))
    # The full mask: a leading BOS's embedding is an ordinary row of the table, not an attention-sink state.
    return HIDDEN_METRICS[term.cfg.metric](student, teacher, x.mask)


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
            raise ConfigError(
                f"{where}.num_relation_heads: {h} does not divide the projection width {bad[0]}; "
                f"pick a divisor of {math.gcd(*widths)}"
            )
        return {"heads": h}
    for h in range(num_heads_of(student), 0, -1):
        if all(w % h == 0 for w in widths):
            return {"heads": h}
    return {"heads": 1}


def relation_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    # The full mask: a leading BOS stays a key, since the relations' softmax over keys includes the sink.
    return mean(
        [
            L.relation_kl(
                x.student.qkv[(s, part)],
                x.teacher.qkv[(t, part)],
                x.mask,
                num_relation_heads=term.params["heads"],
                temperature=temperature,
            )
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
            L.info_nce(
                projected(term, x, s),
                x.teacher.hidden[t],
                x.features(),
                temperature=temperature,
                symmetric=c.symmetric,
                max_tokens=c.max_tokens,
            )
            for s, t in term.pairs
        ]
    )


HIDDEN = TermType(
    HiddenConfig,
    hidden_term,
    "block outputs through a projector when widths differ",
    needs=hidden_needs,
    projected=True,
    cached=True,
    prepare=hidden_norms,
)
EMBEDDING = TermType(
    EmbeddingConfig,
    embedding_term,
    "input embedding outputs through a projector when widths differ",
    projected=True,
    prepare=embedding_modules,
)
ATTENTION = TermType(
    AttentionConfig,
    attention_term,
    "attention maps (eager attention is switched on, with a warning)",
    needs=attention_needs,
    eager_attention=True,
)
RELATION = TermType(
    RelationConfig,
    relation_term,
    "MiniLMv2 q/k/v self-relations (works with SDPA/flash)",
    needs=relation_needs,
    prepare=relation_heads,
    cached=True,
)
CONTRASTIVE = TermType(
    ContrastiveConfig,
    contrastive_term,
    "InfoNCE between student and teacher token features",
    needs=contrastive_needs,
    projected=True,
    cached=True,
)
