"""Terms for a teacher and a student with different tokenizers: they compare the two models span by span.

Both models read the same text in their own tokens; ``x.pair`` holds the
teacher's tokens and the aligned span of every token on both sides
(``alignkd.data.pairs``), and ``x.task.matched`` the ids that spell the same
text in both vocabularies. Span 0 holds each side's first token, which nothing
predicts, so no term compares it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkd.checks import one_of
from alignkd.errors import ConfigError
from alignkd.losses.spans import (
    SPAN_KINDS,
    SPAN_POOLS,
    compared,
    hybrid_kl,
    span_firsts,
    span_likelihood_loss,
    span_logprobs,
    span_states,
)
from alignkd.terms.base import Layered, Projected, StepTensors, Tempered, Term, TermConfig, TermType, mean
from alignkd.terms.features import HIDDEN_METRICS, hidden_needs, projected


def _pair(x: StepTensors, name: str):
    if x.pair is None:
        raise ConfigError(
            f"losses: {name} compares two tokenizations of one text, and the two models share a tokenizer; "
            "use kl (or hidden) instead"
        )
    return x.pair


# ----------------------------------------------------------------------------- span likelihood


@dataclass
class SpanLikelihoodConfig(Tempered, TermConfig):
    """The student's log-likelihood of each aligned span of text against the teacher's (approximate likelihood
    matching, Minixhofer et al., arXiv 2503.20083). Works across tokenizers."""

    type: str = "span_likelihood"

    kind: str = "bernoulli"
    """bernoulli (the KL between the two models' probabilities that the text continues with the span) or l1 (the
    absolute difference of the two log-likelihoods)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_temperature(where)
        one_of(self.kind, SPAN_KINDS, f"{where}.kind")


def span_likelihood_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    p = _pair(x, "span_likelihood")
    spans = p.spans
    student = span_logprobs(x.student.logits, x.input_ids, p.student_span, spans)
    with torch.no_grad():
        teacher = span_logprobs(x.teacher.logits, p.teacher_ids, p.teacher_span, spans)
    return span_likelihood_loss(
        student, teacher, compared(p.student_span, p.teacher_span, spans), kind=term.cfg.kind, temperature=temperature
    )


# ----------------------------------------------------------------------------- hybrid


@dataclass
class HybridConfig(Tempered, TermConfig):
    """At each aligned next-token position: KL over the tokens whose text is the same in both vocabularies, ULD
    (sorted probabilities, Boizard et al., arXiv 2402.12030) over the rest. Works across tokenizers; with one
    tokenizer it is the forward KL."""

    type: str = "hybrid"

    uld_weight: float = 1.0
    """Weight of the ULD part over the unmatched tokens (0: the matched KL alone)."""
    uld_top: int | None = 256
    """ULD compares each side's this many largest unmatched probabilities (None: all of them, a sort of the whole
    vocabulary per position)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_temperature(where)
        if self.uld_weight < 0:
            raise ConfigError(f"{where}.uld_weight: must be >= 0")
        if self.uld_top is not None and self.uld_top < 1:
            raise ConfigError(f"{where}.uld_top: must be >= 1, or null for every token")


def aligned_next(x: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, Vs], [N, Vt])``: the student's and the teacher's logits at the positions that predict the first token
    of a compared span (both read the same text before it)."""
    p = x.pair
    spans = p.spans
    both = compared(p.student_span, p.teacher_span, spans)
    rows, span = both.nonzero(as_tuple=True)
    s_pos = span_firsts(p.student_span, spans)[rows, span] - 1
    t_pos = span_firsts(p.teacher_span, spans)[rows, span] - 1
    return x.student.logits[rows, s_pos], x.teacher.logits[rows, t_pos]


def hybrid_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    _pair(x, "hybrid")
    s, t = aligned_next(x)
    ms, mt = (m.to(s.device) for m in x.task.matched)
    c = term.cfg
    return hybrid_kl(s, t, ms, mt, temperature=temperature, uld_weight=c.uld_weight, uld_top=c.uld_top)


# ----------------------------------------------------------------------------- span hidden states


@dataclass
class SpanHiddenConfig(Projected, Layered, TermConfig):
    """Block outputs of mapped layers, one state per aligned span on each side (its last token's or its tokens'
    mean), through a projector where the widths differ. Works across tokenizers."""

    type: str = "span_hidden"

    metric: str = "mse"
    """mse, cosine or standardized, as for ``hidden``."""
    pool: str = "last"
    """last (the span's last token's state, which has read the whole span) or mean (of its tokens' states)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where)
        self.check_projector(where)
        one_of(self.metric, list(HIDDEN_METRICS), f"{where}.metric")
        one_of(self.pool, SPAN_POOLS, f"{where}.pool")


def span_hidden_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    p = _pair(x, "span_hidden")
    spans, c = p.spans, term.cfg
    metric = HIDDEN_METRICS[c.metric]
    both = compared(p.student_span, p.teacher_span, spans)
    values = []
    for s, t in term.pairs:
        student = span_states(projected(term, x, s), p.student_span, spans, c.pool)
        teacher = span_states(x.teacher.hidden[t], p.teacher_span, spans, c.pool)
        values.append(metric(student, teacher, both))
    return mean(values)


SPAN_LIKELIHOOD = TermType(
    SpanLikelihoodConfig,
    span_likelihood_term,
    "log-likelihoods of aligned text spans (any two tokenizers)",
    reads_logits=True,
)
HYBRID = TermType(
    HybridConfig,
    hybrid_term,
    "next-token distributions at aligned positions: KL on same-text tokens, ULD on the rest (any two tokenizers)",
    reads_logits=True,
)
SPAN_HIDDEN = TermType(
    SpanHiddenConfig,
    span_hidden_term,
    "block outputs pooled per aligned span (any two tokenizers)",
    needs=hidden_needs,
    projected=True,
)
SPAN_TYPES = ("span_likelihood", "hybrid", "span_hidden")
"""The term types that compare two tokenizations; with different tokenizers only these (and ce) apply."""
