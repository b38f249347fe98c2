"""Span-level losses across tokenizers (``alignkd.losses.spans``) against plain references written here."""

from __future__ import annotations

import math

import pytest
import torch

from alignkd.losses.spans import compared, span_likelihood_loss, span_logprobs


def _case(b=3, t=7, v=11, spans=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    # increasing span ids per row, with a NO_SPAN tail on the last row
    span = torch.sort(torch.randint(0, spans, (b, t), generator=g), dim=1).values
    span[:, 0] = 0
    span[-1, -2:] = -1
    return logits, ids, span, spans


def _span_logprobs_by_hand(logits, ids, span, spans):
    out = torch.zeros(ids.shape[0], spans, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            if span[b, j] >= 0:
                out[b, span[b, j]] = out[b, span[b, j]] + torch.log_softmax(logits[b, j - 1], -1)[ids[b, j]]
    return out


def test_span_logprobs_sum_each_spans_predicted_tokens_values_and_gradients():
    logits, ids, span, spans = _case()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = span_logprobs(a, ids, span, spans)
    want = _span_logprobs_by_hand(b, ids, span, spans)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    w = torch.randn(got.shape, dtype=torch.float64)
    (got.double() * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_compared_spans_are_those_both_sides_hold_never_span_0():
    s = torch.tensor([[0, 1, 1, 2, -1], [0, 0, 1, 2, 3]])
    t = torch.tensor([[0, 0, 1, 3, 3], [0, 1, 2, 3, -1]])
    got = compared(s, t, 4)
    assert got.tolist() == [[False, True, False, False], [False, True, True, True]]


def _bernoulli_kl_by_hand(s, t, mask, temperature):
    xs, xt = (s.double() / temperature).clamp(max=-1e-6), (t.double() / temperature).clamp(max=-1e-6)
    ps, pt = xs.exp(), xt.exp()
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    return kl[mask].mean()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_bernoulli_span_loss_matches_the_plain_formula_values_and_gradients(temperature):
    g = torch.Generator().manual_seed(1)
    s = (-torch.rand(3, 5, generator=g) * 6).requires_grad_(True)  # log-likelihoods from -6 to 0
    t = -torch.rand(3, 5, generator=g) * 6
    mask = torch.rand(3, 5, generator=g) > 0.3
    s2 = s.detach().double().requires_grad_(True)
    got = span_likelihood_loss(s, t, mask, temperature=temperature)
    want = _bernoulli_kl_by_hand(s2, t, mask, temperature)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(s.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


def test_span_loss_edge_cases():
    s = torch.tensor([[-1.0, -2.0, -30.0, -1e-9]], requires_grad=True)
    none = span_likelihood_loss(s, s.detach(), torch.zeros(1, 4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))  # all masked: 0, not NaN
    same = span_likelihood_loss(s, s.detach(), torch.ones(1, 4, dtype=torch.bool))
    assert same.item() == pytest.approx(0.0, abs=1e-7) and math.isfinite(same.item())  # equal: 0, finite near p = 1
    l1 = span_likelihood_loss(s, s.detach() - 1, torch.ones(1, 4, dtype=torch.bool), kind="l1", temperature=2.0)
    assert l1.item() == pytest.approx(0.5)
    bf = span_likelihood_loss(s.bfloat16(), (s.detach() - 0.5).bfloat16(), torch.ones(1, 4, dtype=torch.bool))
    ref = span_likelihood_loss(s.float(), s.detach().float() - 0.5, torch.ones(1, 4, dtype=torch.bool))
    assert bf.dtype == torch.float32 and bf.item() == pytest.approx(ref.item(), rel=2e-2)
    with pytest.raises(ValueError, match="kind must be one of"):
        span_likelihood_loss(s, s, torch.ones(1, 4, dtype=torch.bool), kind="l2")
