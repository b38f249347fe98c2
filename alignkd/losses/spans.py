"""Span-level losses for a teacher and a student with different tokenizers.

Both models read the same text in their own tokens, and the text is cut into
aligned spans (``alignkd.data.spans``): span ``k`` is spelled by some teacher
tokens and some student tokens. A span's log-likelihood under a model is the
sum of the log-probabilities of its tokens, each predicted from the tokens
before it; the two models are then compared span by span, as approximate
likelihood matching does (Minixhofer et al., arXiv 2503.20083).

Span 0 holds each side's first token, which nothing predicts, so it is never
compared.
"""

from __future__ import annotations

import torch

SPAN_KINDS = ("bernoulli", "l1")


def span_logprobs(logits: torch.Tensor, ids: torch.Tensor, span: torch.Tensor, spans: int) -> torch.Tensor:
    """``[B, S]`` float32: each span's log-likelihood, the sum of its tokens' log-probabilities.

    ``logits`` ``[B, T, V]`` (position ``j`` predicts token ``j + 1``), ``ids``
    ``[B, T]``, ``span`` ``[B, T]`` the span of each token (negative: none),
    ``spans``: ``S``. Span 0 and spans without tokens sum to 0.
    """
    b, t = ids.shape
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    target = span[:, 1:].long()
    keep = target >= 0
    out = logp.new_zeros(b, spans)
    return out.scatter_add(1, target.clamp(min=0), torch.where(keep, logp, torch.zeros_like(logp)))


def compared(student_span: torch.Tensor, teacher_span: torch.Tensor, spans: int) -> torch.Tensor:
    """``[B, S]`` bool: the spans both sides hold tokens of, span 0 excepted."""
    have = []
    for span in (student_span, teacher_span):
        s = span.long()
        h = torch.zeros(s.shape[0], spans, dtype=torch.bool, device=s.device)
        h.scatter_(1, s.clamp(min=0), s >= 0)  # a NO_SPAN token writes False over span 0, which never counts anyway
        have.append(h)
    both = have[0] & have[1]
    both[:, 0] = False
    return both


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and far below it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_likelihood_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "bernoulli",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over the compared spans of a distance between the two span log-likelihoods ``[B, S]``; 0 with none.

    ``bernoulli``: the KL from Bernoulli(p_teacher) to Bernoulli(p_student), where
    ``p = exp(log-likelihood / temperature)``: each span is an event the text
    either continues with or not, and the student is asked to give it the
    teacher's probability (0 when equal; a higher temperature softens long spans'
    vanishing probabilities). ``l1``: ``|student - teacher| / temperature``.
    """
    m = mask.bool()
    if not m.any():
        return student.sum() * 0.0  # keeps the graph, never NaN
    xs = (student.float() / temperature)[m]
    xt = (teacher.float() / temperature)[m].detach()
    if kind == "l1":
        return (xs - xt).abs().mean()
    if kind != "bernoulli":
        raise ValueError(f"kind must be one of {SPAN_KINDS}, got {kind!r}")
    # A span of probability 1 (log-likelihood 0) has no complement: keep both just below.
    tiny = -1e-6
    xs, xt = xs.clamp(max=tiny), xt.clamp(max=tiny)
    pt = xt.exp()
    kl = pt * (xt - xs) + (1 - pt) * (_log1mexp(xt) - _log1mexp(xs))
    return kl.mean()
