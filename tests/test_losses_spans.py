"""Span-level losses across tokenizers (``alignkd.losses.spans``) against plain references written here."""

from __future__ import annotations

import math

import pytest
import torch

from alignkd.losses.logits import kl_div
from alignkd.losses.spans import (
    compared,
    hybrid_kl,
    span_firsts,
    span_lasts,
    span_likelihood_loss,
    span_logprobs,
    span_states,
)


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


def test_span_firsts_and_lasts_by_hand():
    span = torch.tensor([[0, 1, 1, 3, -1], [0, 0, 1, 2, 2]])
    assert span_firsts(span, 4).tolist() == [[0, 1, 5, 3], [0, 2, 3, 5]]
    assert span_lasts(span, 4).tolist() == [[0, 2, -1, 3], [1, 2, 4, -1]]


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_span_states_pool_each_spans_tokens_values_and_gradients(pool, dtype):
    g = torch.Generator().manual_seed(3)
    span = torch.tensor([[0, 1, 1, 1, 3, -1, -1], [0, 0, 1, 2, 2, 2, 2]])
    h = torch.randn(2, 7, 5, generator=g).to(dtype).requires_grad_(True)
    h2 = h.detach().double().requires_grad_(True)
    got = span_states(h, span, 4, pool)
    want = torch.zeros(2, 4, 5, dtype=torch.float64)
    for b in range(2):
        for k in range(4):
            rows = [j for j in range(7) if span[b, j] == k]
            if rows:
                want[b, k] = h2[b, rows[-1]] if pool == "last" else h2[b, rows].mean(0)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got.double() * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=tol, atol=tol)
    assert torch.equal(got[0, 2], torch.zeros(5, dtype=dtype))  # span 2 has no tokens in row 0


def _hybrid_by_hand(s, t, ms, mt, temperature, uld_weight, top):
    total = 0.0
    for i in range(s.shape[0]):
        ps = torch.softmax(s[i].double() / temperature, -1)
        pt = torch.softmax(t[i].double() / temperature, -1)
        a, b = pt[mt] / pt[mt].sum(), ps[ms] / ps[ms].sum()
        kl = (a * (a / b).log()).sum() * temperature**2
        keep_s = torch.tensor([j not in ms.tolist() for j in range(len(ps))])
        keep_t = torch.tensor([j not in mt.tolist() for j in range(len(pt))])
        rest_s = torch.sort(ps[keep_s], descending=True).values[:top]
        rest_t = torch.sort(pt[keep_t], descending=True).values[:top]
        n = max(len(rest_s), len(rest_t))
        rest_s = torch.cat([rest_s, rest_s.new_zeros(n - len(rest_s))])
        rest_t = torch.cat([rest_t, rest_t.new_zeros(n - len(rest_t))])
        uld = (rest_s - rest_t).abs().sum()
        total = total + kl + uld_weight * uld
    return total / s.shape[0]


@pytest.mark.parametrize("temperature,uld_weight,top", [(1.0, 1.0, 256), (2.0, 0.5, 3)])
def test_hybrid_kl_matches_the_plain_formula(temperature, uld_weight, top):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 9, generator=g, dtype=torch.float64).requires_grad_(True)  # student: 9 tokens
    t = torch.randn(5, 13, generator=g, dtype=torch.float64)  # teacher: 13
    ms, mt = torch.tensor([0, 2, 3, 7]), torch.tensor([5, 0, 12, 1])
    got = hybrid_kl(s.float(), t.float(), ms, mt, temperature=temperature, uld_weight=uld_weight, uld_top=top)
    want = _hybrid_by_hand(s, t, ms, mt, temperature, uld_weight, top)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    s2 = s.detach().clone().requires_grad_(True)
    hybrid_kl(s2, t, ms, mt, temperature=temperature, uld_weight=uld_weight, uld_top=top).backward()
    want.backward()
    torch.testing.assert_close(s2.grad, s.grad, rtol=1e-5, atol=1e-8)


def test_hybrid_kl_with_one_vocabulary_is_the_forward_kl_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 17, generator=g).requires_grad_(True)
    t = torch.randn(6, 17, generator=g)
    ids = torch.arange(17)
    got = hybrid_kl(s, t, ids, ids, temperature=2.0)
    s2 = s.detach().clone().requires_grad_(True)
    want = kl_div(s2, t, kind="forward", temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-8)


def test_hybrid_kl_edge_cases():
    s = torch.zeros(0, 4, requires_grad=True)
    none = hybrid_kl(s, torch.zeros(0, 6), torch.tensor([0]), torch.tensor([1]))
    none.backward()
    assert none.item() == 0.0
    x = torch.randn(2, 4)
    same = hybrid_kl(x, x, torch.arange(4), torch.arange(4))
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    bf = hybrid_kl(x.bfloat16(), torch.randn(2, 6).bfloat16(), torch.tensor([0, 1]), torch.tensor([3, 4]))
    assert bf.dtype == torch.float32 and math.isfinite(bf.item())
