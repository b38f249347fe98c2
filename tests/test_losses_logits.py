"""Tests of the logit losses (kl_div, dkd) against the spec (sparse_kl: tests/test_cache.py).

The references below are deliberately naive: one position at a time, textbook
softmax and KL in float64, so that they share no code (and no tricks such as
logaddexp mixtures or logsumexp splits) with the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_equal, pad_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkd.losses import KL_KINDS, dkd, kl_div, sparse_kl

KINDS = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd")
# Non-default mixture weights too: at beta=0.5 jsd is symmetric and a swapped
# weight would go unnoticed.
KIND_ARGS = [
    ("forward", {}),
    ("reverse", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_forward", {}),
    ("skew_forward", {"alpha": 0.35}),
    ("skew_reverse", {}),
    ("skew_reverse", {"alpha": 0.35}),
    ("tvd", {}),
]
KIND_IDS = [k + "".join(f"-{a}{v}" for a, v in kw.items()) for k, kw in KIND_ARGS]

B, T, V = 3, 47, 123  # odd sizes on purpose: no power-of-two shortcut hides a bug


# ----------------------------------------------------------------------------- references


def softmax_ref(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Random float64 logits never give a probability of exactly 0, so the plain
    # formula is safe here.
    return torch.sum(p * (torch.log(p) - torch.log(q)))


def divergence_ref(ps: torch.Tensor, pt: torch.Tensor, kind: str, beta: float, alpha: float) -> torch.Tensor:
    if kind == "forward":
        return kl_ref(pt, ps)
    if kind == "reverse":
        return kl_ref(ps, pt)
    if kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl_ref(pt, m) + (1 - beta) * kl_ref(ps, m)
    if kind == "skew_forward":
        return kl_ref(pt, alpha * pt + (1 - alpha) * ps)
    if kind == "skew_reverse":
        return kl_ref(ps, alpha * ps + (1 - alpha) * pt)
    if kind == "tvd":
        return 0.5 * torch.sum(torch.abs(pt - ps))
    raise AssertionError(kind)


def _counted(shape_lead, mask):
    n = math.prod(shape_lead)
    return [True] * n if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]


def kl_div_ref(s, t, mask=None, *, kind="forward", temperature=1.0, beta=0.5, alpha=0.1):
    v = s.shape[-1]
    s2, t2 = s.reshape(-1, v), t.reshape(-1, v)
    total, n = s2.new_zeros(()), 0
    for i, keep in enumerate(_counted(s.shape[:-1], mask)):
        if not keep:
            continue
        ps = softmax_ref(s2[i] / temperature)
        pt = softmax_ref(t2[i] / temperature)
        total = total + divergence_ref(ps, pt, kind, beta, alpha) * temperature**2
        n += 1
    return total / n if n else total


def dkd_ref(s, t, target, mask=None, *, alpha=1.0, beta=8.0, temperature=4.0):
    v = s.shape[-1]
    s2, t2, tg = s.reshape(-1, v), t.reshape(-1, v), target.reshape(-1).tolist()
    total, n = s2.new_zeros(()), 0
    for i, keep in enumerate(_counted(s.shape[:-1], mask)):
        g = tg[i]
        if not keep or g < 0:
            continue
        ps = softmax_ref(s2[i] / temperature)
        pt = softmax_ref(t2[i] / temperature)
        # TCKD: binary (target, not target) distributions.
        bs = torch.stack([ps[g], 1 - ps[g]])
        bt = torch.stack([pt[g], 1 - pt[g]])
        tckd = kl_ref(bt, bs)
        # NCKD: the distributions renormalised over the non-target classes.
        others = [j for j in range(v) if j != g]
        qs, qt = ps[others], pt[others]
        nckd = kl_ref(qt / qt.sum(), qs / qs.sum())
        total = total + (alpha * tckd + beta * nckd) * temperature**2
        n += 1
    return total / n if n else total


# ----------------------------------------------------------------------------- helpers


def logits(gen, *shape, scale=3.0):
    # Scale 3 gives peaked distributions with tiny probabilities in the tail.
    return torch.randn(*shape, generator=gen) * scale


# ----------------------------------------------------------------------------- kl_div parity


def test_kl_kinds_match_the_spec():
    assert set(KL_KINDS) == set(KINDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind,kw", KIND_ARGS, ids=KIND_IDS)
def test_kl_div_parity_btv(parity, gen, rand_mask, kind, kw, temperature, dtype):
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    mask = rand_mask((B, T), gen)
    parity(
        lambda x, y, m: kl_div(x, y, m, kind=kind, temperature=temperature, **kw),
        lambda x, y, m: kl_div_ref(x, y, m, kind=kind, temperature=temperature, **kw),
        s,
        t,
        mask,
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind,kw", KIND_ARGS, ids=KIND_IDS)
def test_kl_div_parity_nv(parity, gen, rand_mask, kind, kw, dtype):
    # The flat [N, V] form with a [N] mask.
    n, v = 61, 37
    s, t = logits(gen, n, v), logits(gen, n, v)
    mask = rand_mask((n,), gen)
    parity(
        lambda x, y, m: kl_div(x, y, m, kind=kind, temperature=1.5, **kw),
        lambda x, y, m: kl_div_ref(x, y, m, kind=kind, temperature=1.5, **kw),
        s,
        t,
        mask,
        dtype=dtype,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_kl_div_mask_none_counts_everything(parity, gen, kind):
    s, t = logits(gen, 2, 9, 29), logits(gen, 2, 9, 29)
    out, _ = parity(lambda x, y: kl_div(x, y, kind=kind), lambda x, y: kl_div_ref(x, y, kind=kind), s, t)
    ones = kl_div(s, t, torch.ones(2, 9, dtype=torch.bool), kind=kind)
    assert_equal(out, ones)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_div_float64_input_gives_float32(gen, kind):
    s, t = logits(gen, 4, 11).double(), logits(gen, 4, 11).double()
    assert kl_div(s, t, kind=kind).dtype == torch.float32


# ----------------------------------------------------------------------------- kl_div properties


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kind,kw", KIND_ARGS, ids=KIND_IDS)
def test_kl_div_identical_inputs_give_zero(gen, rand_mask, kind, kw, temperature):
    x = logits(gen, B, T, V)
    out = kl_div(x, x.clone(), rand_mask((B, T), gen), kind=kind, temperature=temperature, **kw)
    assert abs(out.item()) < 1e-6, f"{kind}: divergence of identical inputs is {out.item()}"


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_jsd_is_symmetric_at_half(gen, rand_mask, temperature):
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    mask = rand_mask((B, T), gen)
    a = kl_div(s, t, mask, kind="jsd", beta=0.5, temperature=temperature)
    b = kl_div(t, s, mask, kind="jsd", beta=0.5, temperature=temperature)
    assert a.item() > 1e-3  # not trivially symmetric because both are 0
    assert_equal(a, b)


def test_jsd_swap_maps_beta_to_one_minus_beta(gen, rand_mask):
    # From the formula: swapping student and teacher and beta <-> 1-beta gives the same loss.
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    mask = rand_mask((B, T), gen)
    assert_equal(kl_div(s, t, mask, kind="jsd", beta=0.2), kl_div(t, s, mask, kind="jsd", beta=0.8))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("skew,plain", [("skew_forward", "forward"), ("skew_reverse", "reverse")])
def test_skew_with_alpha_zero_is_plain_kl(gen, rand_mask, skew, plain, temperature):
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    mask = rand_mask((B, T), gen)
    xs = s.clone().requires_grad_(True)
    a = kl_div(xs, t, mask, kind=skew, alpha=0.0, temperature=temperature)
    (ga,) = torch.autograd.grad(a, xs)
    xp = s.clone().requires_grad_(True)
    b = kl_div(xp, t, mask, kind=plain, temperature=temperature)
    (gb,) = torch.autograd.grad(b, xp)
    assert_equal(a, b)
    assert_equal(ga, gb, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_temperature_scaling_formula(gen, rand_mask, kind, temperature):
    # kl at temperature T == T**2 * kl of (logits / T) at temperature 1.
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    mask = rand_mask((B, T), gen)
    hot = kl_div(s, t, mask, kind=kind, temperature=temperature)
    cold = kl_div(s / temperature, t / temperature, mask, kind=kind, temperature=1.0)
    torch.testing.assert_close(hot.double(), temperature**2 * cold.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["btv", "nv"])
@pytest.mark.parametrize("kind", KINDS)
def test_kl_div_all_masked_is_zero(gen, all_masked, kind, form):
    shape = (B, T, V) if form == "btv" else (T, V)
    s, t = logits(gen, *shape), logits(gen, *shape)
    mask = torch.zeros(shape[:-1], dtype=torch.bool)
    all_masked(lambda x: kl_div(x, t, mask, kind=kind, temperature=2.0), s)


@pytest.mark.parametrize("fill", [1e30, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("kind", KINDS)
def test_kl_div_padding_position_and_content_do_not_matter(gen, kind, fill):
    # Same content, padded left vs right, with garbage (huge values, inf, NaN) in
    # the padding: same value, same gradient on the content, no NaN anywhere.
    lengths = [5, 11, 1]
    length = 13
    srows = [logits(gen, n, V) for n in lengths]
    trows = [logits(gen, n, V) for n in lengths]
    results = []
    for side in ("left", "right"):
        s, mask = pad_rows(srows, length, side, fill, gen)
        t, _ = pad_rows(trows, length, side, fill, gen)
        s.requires_grad_(True)
        out = kl_div(s, t, mask, kind=kind, temperature=2.0)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()
        assert (g[~mask] == 0).all()
        results.append((out, g[mask]))
    flat = kl_div(torch.cat(srows), torch.cat(trows), kind=kind, temperature=2.0)
    assert_equal(results[0][0], results[1][0])
    assert_equal(results[0][0], flat)
    assert_equal(results[0][1], results[1][1], atol=1e-7)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    sides=st.lists(st.sampled_from(["left", "right"]), min_size=4, max_size=4),
    kind=st.sampled_from(KINDS),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_kl_div_padding_invariance_property(lengths, sides, kind, temperature, seed):
    # Any layout of the padding (per row left or right, any extra length) gives
    # the loss of the counted rows stacked as [N, V]; and every divergence is >= 0.
    gen = torch.Generator().manual_seed(seed)
    v = 17
    length = max(lengths) + 2
    s = logits(gen, len(lengths), length, v)
    t = logits(gen, len(lengths), length, v)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n:
            sl = slice(0, n) if sides[b] == "right" else slice(length - n, length)
            mask[b, sl] = True
    s[~mask] = 1e30
    t[~mask] = -1e30
    out = kl_div(s, t, mask, kind=kind, temperature=temperature)
    flat = kl_div(s[mask], t[mask], kind=kind, temperature=temperature)
    assert torch.isfinite(out)
    assert out.item() >= -1e-6
    if kind == "tvd":
        assert out.item() <= temperature**2 + 1e-5
    assert_equal(out, flat)


# ----------------------------------------------------------------------------- kl_div errors


def test_kl_div_unknown_kind_raises(gen):
    s = logits(gen, 3, 5)
    with pytest.raises(ValueError, match="kind"):
        kl_div(s, s, kind="backward")


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_beta_outside_open_interval_raises(gen, beta):
    s = logits(gen, 3, 5)
    with pytest.raises(ValueError, match="beta"):
        kl_div(s, s, kind="jsd", beta=beta)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_kl_div_non_positive_temperature_raises(gen, temperature):
    s = logits(gen, 3, 5)
    with pytest.raises(ValueError, match="temperature"):
        kl_div(s, s, temperature=temperature)


@pytest.mark.parametrize("s_shape,t_shape", [((2, 3, 5), (2, 3, 6)), ((2, 3, 5), (2, 4, 5)), ((6, 5), (2, 3, 5))])
def test_kl_div_shape_mismatch_raises(gen, s_shape, t_shape):
    with pytest.raises(ValueError, match=r"\S"):
        kl_div(logits(gen, *s_shape), logits(gen, *t_shape))


@pytest.mark.parametrize("mask_shape", [(2, 4), (6,), (2, 3, 5)])
def test_kl_div_mask_shape_mismatch_raises(gen, mask_shape):
    s = logits(gen, 2, 3, 5)
    with pytest.raises(ValueError, match="mask"):
        kl_div(s, s, torch.ones(mask_shape, dtype=torch.bool))


@pytest.mark.parametrize(
    "bad",
    [{"kind": "backward"}, {"kind": "jsd", "beta": 1.0}, {"kind": "skew_reverse", "alpha": 1.0}, {"temperature": 0}],
)
def test_divergence_errors_name_the_function_called(gen, bad):
    # kl_div's argument checks are shared with sparse_kl (and the LM-head losses): each
    # reports under its own name.
    s = logits(gen, 2, 3, 5)
    top = (torch.zeros(2, 3, 2, dtype=torch.long), torch.full((2, 3, 2), -2.0), torch.full((2, 3), -1.0))
    for name, call in (("kl_div", lambda: kl_div(s, s, **bad)), ("sparse_kl", lambda: sparse_kl(s, *top, **bad))):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(f"{name}: "), str(e.value)


# ----------------------------------------------------------------------------- dkd


def random_targets(gen, shape, v, ignore_frac=0.15):
    tgt = torch.randint(0, v, shape, generator=gen)
    tgt[torch.rand(shape, generator=gen) < ignore_frac] = -100
    return tgt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("ab", [{}, {"alpha": 0.7, "beta": 3.0}], ids=["default", "a0.7-b3"])
def test_dkd_parity_btv(parity, gen, rand_mask, ab, temperature, dtype):
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    tgt = random_targets(gen, (B, T), V)
    mask = rand_mask((B, T), gen)
    parity(
        lambda x, y, m: dkd(x, y, tgt, m, temperature=temperature, **ab),
        lambda x, y, m: dkd_ref(x, y, tgt, m, temperature=temperature, **ab),
        s,
        t,
        mask,
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_dkd_parity_nv(parity, gen, rand_mask, dtype):
    n, v = 53, 19
    s, t = logits(gen, n, v), logits(gen, n, v)
    tgt = random_targets(gen, (n,), v)
    mask = rand_mask((n,), gen)
    parity(
        lambda x, y, m: dkd(x, y, tgt, m, alpha=2.0, beta=5.0, temperature=2.0),
        lambda x, y, m: dkd_ref(x, y, tgt, m, alpha=2.0, beta=5.0, temperature=2.0),
        s,
        t,
        mask,
        dtype=dtype,
    )


def test_dkd_mask_none(parity, gen):
    s, t = logits(gen, 2, 7, 13), logits(gen, 2, 7, 13)
    tgt = random_targets(gen, (2, 7), 13)
    parity(lambda x, y: dkd(x, y, tgt), lambda x, y: dkd_ref(x, y, tgt), s, t)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_identical_inputs_give_zero(gen, rand_mask, temperature):
    x = logits(gen, B, T, V)
    out = dkd(x, x.clone(), random_targets(gen, (B, T), V), rand_mask((B, T), gen), temperature=temperature)
    assert abs(out.item()) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_two_classes_is_tckd_by_hand(temperature):
    # With 2 classes the non-target distribution is a single class: NCKD = 0 and
    # the loss is alpha * TCKD * T**2, computed here with scalar maths.
    s = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-3.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [-2.0, 2.0], [0.0, 0.0]])
    tgt = torch.tensor([0, 1, 0])
    alpha = 0.6
    out = dkd(s, t, tgt, alpha=alpha, beta=8.0, temperature=temperature)

    def p_first(a, b):
        return 1.0 / (1.0 + math.exp(-(a - b) / temperature))

    expected = 0.0
    for (s0, s1), (t0, t1), g in zip(s.tolist(), t.tolist(), tgt.tolist(), strict=True):
        ps, pt = p_first(s0, s1), p_first(t0, t1)
        if g == 1:
            ps, pt = 1 - ps, 1 - pt
        expected += alpha * (pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))) * temperature**2
    expected /= 3
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_ignores_negative_targets(gen, rand_mask):
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    mask = rand_mask((B, T), gen)
    tgt = random_targets(gen, (B, T), V, ignore_frac=0.3)
    assert (tgt[mask] == -100).any() and (tgt[mask] >= 0).any()
    xs = s.clone().requires_grad_(True)
    out = dkd(xs, t, tgt, mask)
    (g,) = torch.autograd.grad(out, xs)
    # Same as masking those positions out, with a target that is a valid id.
    counted = mask & (tgt >= 0)
    same = dkd(s, t, tgt.clamp(min=0), counted)
    assert_equal(out, same)
    assert (g[tgt < 0] == 0).all(), "positions with target -100 got a gradient"
    # Other negative ids count as ignored too.
    assert_equal(dkd(s, t, tgt.masked_fill(tgt < 0, -1), mask), out)


def test_dkd_all_ignored_or_masked_is_zero(gen, all_masked):
    s, t = logits(gen, B, T, V), logits(gen, B, T, V)
    all_ignored = torch.full((B, T), -100)
    all_masked(lambda x: dkd(x, t, all_ignored), s)
    tgt = random_targets(gen, (B, T), V)
    all_masked(lambda x: dkd(x, t, tgt, torch.zeros(B, T, dtype=torch.bool)), s)
    all_masked(lambda x: dkd(x, t[0], tgt[0], torch.zeros(T, dtype=torch.bool)), s[0])


@pytest.mark.parametrize("fill", [1e30, float("inf"), float("nan")])
def test_dkd_padding_position_and_content_do_not_matter(gen, fill):
    lengths, length = [6, 2, 9], 12
    srows = [logits(gen, n, V) for n in lengths]
    trows = [logits(gen, n, V) for n in lengths]
    tgts = [torch.randint(0, V, (n,), generator=gen) for n in lengths]
    results = []
    for side in ("left", "right"):
        s, mask = pad_rows(srows, length, side, fill, gen)
        t, _ = pad_rows(trows, length, side, fill, gen)
        tgt = torch.full((len(lengths), length), 7)  # a valid id in the padding: only the mask hides it
        tgt[mask] = torch.cat(tgts)
        s.requires_grad_(True)
        out = dkd(s, t, tgt, mask, alpha=0.5, beta=2.0)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()
        results.append((out, g[mask]))
    assert_equal(results[0][0], results[1][0])
    assert_equal(results[0][1], results[1][1], atol=1e-7)
    assert_equal(results[0][0], dkd(torch.cat(srows), torch.cat(trows), torch.cat(tgts), alpha=0.5, beta=2.0))


def test_dkd_bad_arguments_raise(gen):
    s = logits(gen, 2, 3, 5)
    tgt = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\S"):
        dkd(s, logits(gen, 2, 3, 6), tgt)  # vocabularies differ
    with pytest.raises(ValueError, match="target"):
        dkd(s, s, torch.zeros(2, 4, dtype=torch.long))  # one id per position
    with pytest.raises(ValueError, match="target"):
        dkd(s, s, tgt.float())  # ids must be integers
    with pytest.raises(ValueError, match="mask"):
        dkd(s, s, tgt, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        dkd(s, s, tgt, temperature=0.0)
