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


def span_firsts(span: torch.Tensor, spans: int) -> torch.Tensor:
    """``[B, S]`` int64: the position of each span's first token (``T`` for a span with none).

    ``span`` ``[B, T]``: the span of each token (negative: none).
    """
    b, t = span.shape
    s = span.long()
    pos = torch.arange(t, device=span.device).expand(b, t)
    out = torch.full((b, spans), t, dtype=torch.long, device=span.device)
    return out.scatter_reduce(1, s.clamp(min=0), torch.where(s >= 0, pos, t), "amin")


def span_lasts(span: torch.Tensor, spans: int) -> torch.Tensor:
    """``[B, S]`` int64: the position of each span's last token (-1 for a span with none)."""
    b, t = span.shape
    s = span.long()
    pos = torch.arange(t, device=span.device).expand(b, t)
    out = torch.full((b, spans), -1, dtype=torch.long, device=span.device)
    return out.scatter_reduce(1, s.clamp(min=0), torch.where(s >= 0, pos, -1), "amax")


SPAN_POOLS = ("last", "mean")


def span_states(states: torch.Tensor, span: torch.Tensor, spans: int, pool: str = "last") -> torch.Tensor:
    """``[B, S, D]``: each span's state, its last token's (``last``) or the mean of its tokens' (``mean``); zeros for
    a span with no tokens.

    ``states`` ``[B, T, D]``, ``span`` ``[B, T]`` (negative: none).
    """
    b, t, d = states.shape
    if pool == "last":
        last = span_lasts(span, spans)
        got = states.gather(1, last.clamp(min=0)[..., None].expand(b, spans, d))
        return torch.where((last >= 0)[..., None], got, torch.zeros_like(got))
    if pool != "mean":
        raise ValueError(f"pool must be one of {SPAN_POOLS}, got {pool!r}")
    s = span.long()
    keep = (s >= 0)[..., None]
    index = s.clamp(min=0)[..., None].expand(b, t, d)
    total = states.new_zeros(b, spans, d).scatter_add(1, index, torch.where(keep, states, torch.zeros_like(states)))
    count = states.new_zeros(b, spans).scatter_add(1, s.clamp(min=0), keep[..., 0].to(states.dtype))
    return total / count.clamp(min=1)[..., None]


def hybrid_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_matched: torch.Tensor,
    teacher_matched: torch.Tensor,
    *,
    temperature: float = 1.0,
    uld_weight: float = 1.0,
    uld_top: int | None = 256,
) -> torch.Tensor:
    """Mean over ``N`` aligned positions of a KL on the tokens both vocabularies spell alike, plus ULD on the rest.

    ``student_logits`` ``[N, Vs]`` and ``teacher_logits`` ``[N, Vt]``: each row of both predicts the same next text
    (the first token of an aligned span). ``*_matched`` ``[M]``: ids of the tokens with the same text on both sides,
    pair by pair. With ``p = softmax(logits / temperature)``:

    - on the matched tokens, ``temperature**2 * KL(p_T || p_S)`` of the two distributions renormalised over them
      (with one tokenizer on both sides every token is matched, and this is the forward KL);
    - on the unmatched tokens, ``uld_weight`` times ULD (Boizard et al., arXiv 2402.12030): the L1 distance between
      the two sides' probabilities sorted in decreasing order, the shorter padded with zeros, over the ``uld_top``
      largest of each side (None: all of them).

    0 with no rows (never NaN).
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    with torch.no_grad():
        lt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ms, mt = ls[:, student_matched], lt[:, teacher_matched]
    ms = ms - torch.logsumexp(ms, dim=-1, keepdim=True)
    mt = mt - torch.logsumexp(mt, dim=-1, keepdim=True)
    kl = (mt.exp() * (mt - ms)).sum(-1).mean() * temperature**2
    rest_s = _unmatched(ls, student_matched)
    rest_t = _unmatched(lt, teacher_matched)
    if uld_weight == 0 or (rest_s.shape[1] == 0 and rest_t.shape[1] == 0):
        return kl
    return kl + uld_weight * _uld(rest_s.exp(), rest_t.exp(), uld_top)


def _unmatched(logp: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(logp.shape[1], dtype=torch.bool, device=logp.device)
    keep[matched] = False
    return logp[:, keep]


def _uld(ps: torch.Tensor, pt: torch.Tensor, top: int | None) -> torch.Tensor:
    """Mean over rows of the L1 distance between the sorted probabilities (the ``top`` largest of each side)."""
    k = max(ps.shape[1], pt.shape[1]) if top is None else top
    sides = []
    for p in (ps, pt):
        kk = min(k, p.shape[1])
        v = torch.topk(p, kk, dim=-1).values if kk else p[:, :0]
        sides.append(torch.nn.functional.pad(v, (0, k - kk)))
    return (sides[0] - sides[1]).abs().sum(-1).mean()
