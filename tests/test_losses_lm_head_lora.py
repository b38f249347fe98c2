"""The LM-head losses with a LoRA adapter on the student's head (``student_lora``): the same values and gradients
(w.r.t. the hidden states, A, B and the base head when it trains) as the plain losses on the logits of the merged
head ``W + scale * B @ A``, in float32 and under bf16 autocast, on odd shapes and over several chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkd.losses import kl_div, lm_head_ce, lm_head_kl, lm_head_kl_ce, lm_head_sparse_kl, sparse_kl

N, DS, DT, V, R, SCALE = 23, 13, 11, 37, 3, 1.7  # odd sizes: no chunk or block divides them


def _case(seed: int, head_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s

    h = rand(N, DS).requires_grad_(True)
    w = rand(V, DS, s=0.5).requires_grad_(head_grad)
    a = rand(R, DS, s=0.4).requires_grad_(True)
    b = rand(V, R, s=0.4).requires_grad_(True)  # not zero: the update must count
    ht, wt = rand(N, DT), rand(V, DT, s=0.5)
    mask = torch.rand(N, generator=gen) > 0.25
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) > 0.7] = -100
    return h, w, a, b, ht, wt, mask, labels


def _leaves(h, w, a, b):
    return [x for x in (h, w, a, b) if x.requires_grad]


def _grads(value, leaves):
    return torch.autograd.grad(value, leaves, retain_graph=True)


def _merged_logits(h, w, a, b):
    return h @ (w + SCALE * b @ a).T


def _check(got, want, leaves, tol):
    torch.testing.assert_close(got, want, **tol)
    for g, r in zip(_grads(got, leaves), _grads(want, leaves), strict=True):
        torch.testing.assert_close(g, r, **tol)


F32 = {"rtol": 1e-5, "atol": 1e-6}
BF16 = {"rtol": 3e-2, "atol": 3e-3}


@pytest.mark.parametrize("chunk_tokens", [1, 4, None])
@pytest.mark.parametrize("head_grad", [False, True])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kl_with_an_adapter_equals_kl_div_of_the_merged_head(kind, head_grad, chunk_tokens):
    h, w, a, b, ht, wt, mask, _ = _case(0, head_grad)
    got = lm_head_kl(h, w, ht, wt, mask, kind=kind, chunk_tokens=chunk_tokens, student_lora=(a, b, SCALE))
    want = kl_div(_merged_logits(h, w, a, b), ht @ wt.T, mask, kind=kind)
    _check(got, want, _leaves(h, w, a, b), F32)


@pytest.mark.parametrize("chunk_tokens", [2, None])
def test_ce_with_an_adapter_equals_cross_entropy_of_the_merged_head(chunk_tokens):
    h, w, a, b, *_, labels = _case(1)
    got = lm_head_ce(h, w, labels, chunk_tokens=chunk_tokens, lora=(a, b, SCALE))
    want = F.cross_entropy(_merged_logits(h, w, a, b), labels, ignore_index=-100)
    _check(got, want, _leaves(h, w, a, b), F32)


def test_kl_and_ce_from_one_pass_keep_their_own_adapter_gradients():
    h, w, a, b, ht, wt, mask, labels = _case(2)
    kl, ce = lm_head_kl_ce(h, w, ht, wt, mask, labels, chunk_tokens=3, student_lora=(a, b, SCALE))
    z = _merged_logits(h, w, a, b)
    want_kl = kl_div(z, ht @ wt.T, mask)
    want_ce = F.cross_entropy(z[mask], labels[mask], ignore_index=-100)
    _check(kl, want_kl, [h, a, b], F32)
    _check(ce, want_ce, [h, a, b], F32)


def test_sparse_kl_with_an_adapter_equals_sparse_kl_of_the_merged_head():
    h, w, a, b, ht, wt, mask, _ = _case(3)
    logp = (ht @ wt.T).log_softmax(-1)
    top = logp.topk(5, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    got = lm_head_sparse_kl(h, w, top.indices, top.values, tail, mask, chunk_tokens=4, student_lora=(a, b, SCALE))
    want = sparse_kl(_merged_logits(h, w, a, b), top.indices, top.values, tail, mask)
    _check(got, want, [h, a, b], F32)


def test_under_bf16_autocast_the_adapter_matches_the_merged_head():
    h, w, a, b, ht, wt, mask, labels = _case(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_head_kl(h, w, ht, wt, mask, labels=labels, ce_weight=0.5, student_lora=(a, b, SCALE))
    z = _merged_logits(h, w, a, b)
    want = kl_div(z, ht @ wt.T, mask) + 0.5 * F.cross_entropy(z[mask], labels[mask], ignore_index=-100)
    _check(got, want, [h, a, b], BF16)


def test_all_masked_gives_zero_and_zero_adapter_gradients():
    h, w, a, b, ht, wt, mask, _ = _case(5)
    got = lm_head_kl(h, w, ht, wt, torch.zeros_like(mask), student_lora=(a, b, SCALE))
    assert got.item() == 0.0
    for g in _grads(got, [h, a, b]):
        assert torch.count_nonzero(g) == 0 and torch.isfinite(g).all()


def test_a_zero_b_is_the_plain_head():
    h, w, a, b, ht, wt, mask, _ = _case(6)
    zero = torch.zeros_like(b, requires_grad=True)
    with_adapter = lm_head_kl(h, w, ht, wt, mask, student_lora=(a, zero, SCALE))
    plain = lm_head_kl(h, w, ht, wt, mask)
    torch.testing.assert_close(with_adapter, plain, rtol=0, atol=0)
    g_a, g_b = _grads(with_adapter, [a, zero])
    assert torch.count_nonzero(g_a) == 0  # dA = scale * (g B)^T h, and B is zero
    assert torch.count_nonzero(g_b) > 0  # B learns first, as LoRA does


def test_a_wrongly_shaped_adapter_is_one_clear_error():
    h, w, a, b, ht, wt, mask, _ = _case(7)
    with pytest.raises(ValueError, match=r"lm_head_kl: a LoRA adapter on a head of shape \(37, 13\) has A \[r, 13\]"):
        lm_head_kl(h, w, ht, wt, mask, student_lora=(a.T, b, SCALE))
