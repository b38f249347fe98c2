"""Terms on the models' outputs: cross-entropy on the ground truth, KL variants, decoupled KD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkd import losses as L
from alignkd.checks import one_of
from alignkd.errors import ConfigError
from alignkd.terms.base import StepTensors, Tempered, Term, TermConfig, TermType


@dataclass
class CEConfig(TermConfig):
    """Cross-entropy on the ground truth (next token, masked token or class label)."""

    type: str = "ce"


def ce_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    if x.heads is not None:  # fused: chunked through the head, no logits
        shared = _from_one_walk(term, x)
        if shared is not None:
            return shared
        head = x.heads[0]
        return L.lm_head_ce(
            x.student.final_hidden,
            head.weight,
            _ce_labels(x),
            bias=head.bias,
            softcap=head.softcap,
            vocab=x.vocab,
            lora=head.lora(),
        )
    s, _, _ = x.logits()
    tgt, has = x.targets()
    # ignore_index instead of s[has]: no [N, V] copy forward and no scatter backward.
    tgt = torch.where(has, tgt, torch.full_like(tgt, -100))
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    return ce / has.sum().clamp(min=1)


def _ce_labels(x: StepTensors) -> torch.Tensor:
    """The ground-truth id at each position, -100 where there is none (not counted)."""
    tgt, has = x.targets()
    return torch.where(has, tgt, torch.full_like(tgt, -100))


@dataclass
class DivergenceFields:
    """Mixin: which divergence between two distributions, and its shape parameters."""

    kind: str = "forward"
    """forward, reverse, jsd, skew_forward, skew_reverse or tvd."""
    beta: float = 0.5
    """jsd: weight of the teacher in the mixture, 0 < beta < 1."""
    alpha: float = 0.1
    """skew_forward / skew_reverse: share of the other distribution mixed in."""

    def check_divergence(self, where: str) -> None:
        one_of(self.kind, L.KL_KINDS, f"{where}.kind")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ConfigError(f"{where}.beta: jsd needs 0 < beta < 1")


@dataclass
class KLConfig(DivergenceFields, Tempered, TermConfig):
    """A divergence between the student's and the teacher's output distributions."""

    type: str = "kl"

    def check(self, where: str) -> None:
        super().check(where)
        self.check_temperature(where)
        self.check_divergence(where)


def kl_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    c = term.cfg
    kw = {"kind": c.kind, "temperature": temperature, "beta": c.beta, "alpha": c.alpha}
    if x.teacher.topk_ids is not None:  # teacher from a cache: its top-k and tail mass
        t = x.teacher
        if x.heads is not None:  # fused: chunked through the student's head, no logits
            s = x.heads[0]
            return L.lm_head_sparse_kl(
                x.student.final_hidden,
                s.weight,
                t.topk_ids,
                t.topk_logprobs,
                t.tail,
                x.mask,
                student_bias=s.bias,
                softcap=s.softcap,
                vocab=x.vocab,
                student_lora=s.lora(),
                **kw,
            )
        s, _, m = x.logits()
        return L.sparse_kl(s, t.topk_ids, t.topk_logprobs, t.tail, m, **kw)
    if x.heads is not None:  # fused: chunked through both heads, no logits
        shared = _from_one_walk(term, x)
        if shared is not None:
            return shared
        s, t = x.heads
        return L.lm_head_kl(
            x.student.final_hidden,
            s.weight,
            x.teacher.final_hidden,
            t.weight,
            x.mask,
            student_bias=s.bias,
            teacher_bias=t.bias,
            softcap=s.softcap,
            vocab=x.vocab,
            student_lora=s.lora(),
            **kw,
        )
    s, t, m = x.logits()
    return L.kl_div(s, t, m, **kw)


def _from_one_walk(term: Term, x: StepTensors) -> torch.Tensor | None:
    """``term``'s value from the micro-batch's one walk over the student's head that gives both a KL
    and a CE (``lm_head_kl_ce``), or None when ``term`` walks the head alone.

    Fused, a KL term and a CE term would each make the student's logits from its head, where
    the unfused step makes them once for both; one walk gives both values, each with its own
    gradient, so weighting, GradNorm and the logs see two terms as before. The first KL term on
    a live teacher (a cached one is ``lm_head_sparse_kl``) pairs with the first CE term; any
    further KL or CE term walks alone. The walk runs at whichever of the two is computed first.
    Its CE counts the labelled positions within the KL's mask: the positions with a next token
    are real ones, so that is the CE's own count.
    """
    if x.heads is None or x.teacher.topk_ids is not None:
        return None
    kl = next(((t, temp) for t, temp in x.terms if isinstance(t.cfg, KLConfig)), None)
    ce = next((t for t, _ in x.terms if isinstance(t.cfg, CEConfig)), None)
    if kl is None or ce is None or (term is not kl[0] and term is not ce):
        return None
    if "kl_ce" not in x.shared:
        (kl_term, temperature), (s, t) = kl, x.heads
        c = kl_term.cfg
        x.shared["kl_ce"] = L.lm_head_kl_ce(
            x.student.final_hidden,
            s.weight,
            x.teacher.final_hidden,
            t.weight,
            x.mask,
            _ce_labels(x),
            kind=c.kind,
            temperature=temperature,
            beta=c.beta,
            alpha=c.alpha,
            student_bias=s.bias,
            teacher_bias=t.bias,
            softcap=s.softcap,
            vocab=x.vocab,
            student_lora=s.lora(),
        )
    kl_value, ce_value = x.shared["kl_ce"]
    return kl_value if term is kl[0] else ce_value


@dataclass
class DKDConfig(Tempered, TermConfig):
    """Decoupled KD (Zhao et al., 2022): target-class and non-target-class parts weighted apart."""

    type: str = "dkd"

    temperature: float = 4.0
    """Softening temperature."""
    alpha: float = 1.0
    """Weight of the target-class part (TCKD)."""
    beta: float = 8.0
    """Weight of the non-target-class part (NCKD)."""

    def check(self, where: str) -> None:
        super().check(where)
        self.check_temperature(where)
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError(f"{where}: alpha and beta must be >= 0")


def dkd_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    s, t, m = x.logits()
    tgt, has = x.targets()
    c = term.cfg
    return L.dkd(s, t, tgt, m & has, alpha=c.alpha, beta=c.beta, temperature=temperature)


CE = TermType(
    CEConfig,
    ce_term,
    "ground-truth next token (or label)",
    uses_teacher=False,
    reads_logits=True,
    fused=True,
    cached=True,
)
KL = TermType(KLConfig, kl_term, "output distributions", reads_logits=True, fused=True, cached=True)
DKD = TermType(DKDConfig, dkd_term, "decoupled KD (target / non-target)", reads_logits=True)
