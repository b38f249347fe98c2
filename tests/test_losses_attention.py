"""Tests of the attention losses (attention_kl, relation_kl) against the spec.

References: explicit loops over batch, heads and queries in float64. For
relation_kl the reference does not mask scores at all: it first gathers the
counted positions of each sequence and builds the relation over those only,
which is what "softmax over counted keys" means.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkd.losses import attention_kl, relation_kl

B, H, T = 2, 3, 13
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


# ----------------------------------------------------------------------------- references


def kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over keys, 0 * log 0 = 0 (keys the teacher never attends to)."""
    nz = p > 0
    return torch.sum(p[nz] * (torch.log(p[nz]) - torch.log(q[nz])))


def mean_ref(terms, like):
    if not terms:
        return like.sum() * 0.0
    return sum(terms[1:], terms[0]) / len(terms)


def attention_kl_ref(s, t, mask=None):
    bsz, hs, tq, _ = s.shape
    ht = t.shape[1]
    if hs != ht:
        # Different head counts: each side averaged over its heads, one map each.
        s = (sum(s[:, h] for h in range(hs)) / hs).unsqueeze(1)
        t = (sum(t[:, h] for h in range(ht)) / ht).unsqueeze(1)
    terms = []
    for b in range(bsz):
        for q in range(tq):
            if mask is not None and not mask[b, q]:
                continue
            for h in range(s.shape[1]):
                terms.append(kl_ref(t[b, h, q], s[b, h, q]))
    return mean_ref(terms, s)


def log_softmax_ref(z: torch.Tensor) -> torch.Tensor:
    m = z.max(-1, keepdim=True).values.detach()
    return z - (m + torch.log(torch.exp(z - m).sum(-1, keepdim=True)))


def log_relations_ref(x: torch.Tensor, heads: int, temperature: float) -> list[torch.Tensor]:
    """Per head, the [L, L] log-relation of the counted rows ``x`` ``[L, D]``."""
    dh = x.shape[-1] // heads
    out = []
    for h in range(heads):
        xh = x[:, h * dh : (h + 1) * dh]
        out.append(log_softmax_ref(xh @ xh.T / (math.sqrt(dh) * temperature)))
    return out


def relation_kl_ref(xs, xt, mask=None, *, num_relation_heads, temperature=1.0):
    terms = []
    for b in range(xs.shape[0]):
        idx = [i for i in range(xs.shape[1]) if mask is None or mask[b, i]]
        if not idx:
            continue
        ls = log_relations_ref(xs[b, idx], num_relation_heads, temperature)
        lt = log_relations_ref(xt[b, idx], num_relation_heads, temperature)
        for h in range(num_relation_heads):
            for q in range(len(idx)):
                p = torch.exp(lt[h][q])
                terms.append(torch.sum(p * (lt[h][q] - ls[h][q])))
    return mean_ref(terms, xs)


# ----------------------------------------------------------------------------- helpers


def make_attention(gen, bsz, heads, length, mask=None, *, causal=True, scale=2.0):
    """Attention probabilities as a model makes them: masked keys (and future keys
    when causal) get exactly 0; a query row with no key at all is left at 0."""
    scores = torch.randn(bsz, heads, length, length, generator=gen) * scale
    allowed = torch.ones(bsz, 1, length, length, dtype=torch.bool)
    if mask is not None:
        allowed &= mask[:, None, None, :]
    if causal:
        allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.nan_to_num(p, nan=0.0)


def garbage_like(shape, fill, gen):
    if math.isfinite(fill):
        return fill * torch.sign(torch.randn(shape, generator=gen))
    return torch.full(shape, fill)


# ----------------------------------------------------------------------------- attention_kl


@DTYPES
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_kl_parity(parity, gen, rand_mask, causal, dtype):
    mask = rand_mask((B, T), gen)
    s = make_attention(gen, B, H, T, mask, causal=causal)
    t = make_attention(gen, B, H, T, mask, causal=causal, scale=3.0)
    parity(attention_kl, attention_kl_ref, s, t, mask, dtype=dtype)


@DTYPES
@pytest.mark.parametrize("hs,ht", [(2, 5), (4, 1)])
def test_attention_kl_parity_different_head_counts(parity, gen, rand_mask, hs, ht, dtype):
    mask = rand_mask((B, T), gen)
    s = make_attention(gen, B, hs, T, mask)
    t = make_attention(gen, B, ht, T, mask)
    parity(attention_kl, attention_kl_ref, s, t, mask, dtype=dtype)


def test_attention_kl_mask_none(parity, gen):
    s, t = make_attention(gen, B, H, T), make_attention(gen, B, H, T)
    parity(lambda x, y: attention_kl(x, y), lambda x, y: attention_kl_ref(x, y), s, t)


def test_attention_kl_causal_zeros_give_no_nan(gen):
    # Both maps are 0 above the diagonal: the value is finite and the student gets
    # no gradient there (0 * log 0 contributes nothing).
    s, t = make_attention(gen, B, H, T), make_attention(gen, B, H, T)
    s.requires_grad_(True)
    out = attention_kl(s, t)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    above = ~torch.ones(T, T, dtype=torch.bool).tril()
    assert (g[..., above] == 0).all()


@pytest.mark.parametrize("hs,ht", [(H, H), (2, 4)])
def test_attention_kl_identical_inputs_give_zero(gen, rand_mask, hs, ht):
    mask = rand_mask((B, T), gen)
    if hs == ht:
        a = make_attention(gen, B, hs, T, mask)
        assert attention_kl(a, a.clone(), mask).item() == 0.0
    else:
        # Different head counts with equal head-averages are identical after averaging.
        a = make_attention(gen, B, 1, T, mask)
        assert abs(attention_kl(a.expand(B, hs, T, T), a.expand(B, ht, T, T), mask).item()) < 1e-6


def test_attention_kl_all_masked_is_zero(gen, all_masked):
    none = torch.zeros(B, T, dtype=torch.bool)
    s, t = make_attention(gen, B, H, T), make_attention(gen, B, H, T)
    all_masked(lambda x: attention_kl(x, t, none), s)
    all_masked(lambda x: attention_kl(x, make_attention(gen, B, 2, T), none), s)  # head averaging path


@pytest.mark.parametrize("fill", [1e30, float("inf"), float("nan")])
def test_attention_kl_padding_position_and_content_do_not_matter(gen, fill):
    # The same sequences padded left vs right. Counted queries give masked keys
    # probability 0 (as a model does); masked query rows hold garbage.
    lengths, length = [9, 4], 12
    content_s = [make_attention(gen, 1, H, n)[0] for n in lengths]
    content_t = [make_attention(gen, 1, H, n)[0] for n in lengths]
    results = []
    for side in ("left", "right"):
        mask = torch.zeros(len(lengths), length, dtype=torch.bool)
        maps = []
        for content in (content_s, content_t):
            m = torch.zeros(len(lengths), H, length, length)
            for b, (c, n) in enumerate(zip(content, lengths, strict=True)):
                o = 0 if side == "right" else length - n
                m[b, :, o : o + n, o : o + n] = c
                mask[b, o : o + n] = True
            # garbage in every masked query row
            rows = ~mask[:, None, :, None].expand(m.shape)
            m[rows] = garbage_like((int(rows.sum()),), fill, gen)
            maps.append(m)
        s = maps[0].requires_grad_(True)
        out = attention_kl(s, maps[1], mask)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()
        counted = mask[:, None, :, None] & mask[:, None, None, :]
        results.append((out, g[counted.expand(g.shape)]))
        assert (g[~counted.expand(g.shape)] == 0).all()
    assert_equal(results[0][0], results[1][0])
    assert_equal(results[0][1], results[1][1], atol=1e-7)


def test_attention_kl_bad_arguments_raise(gen):
    a = make_attention(gen, B, H, T)
    with pytest.raises(ValueError, match=r"\S"):
        attention_kl(a[0], a[0])  # [H, T, T]: no batch
    with pytest.raises(ValueError, match=r"\S"):
        attention_kl(a, make_attention(gen, B, H, T + 1))
    with pytest.raises(ValueError, match=r"\S"):
        attention_kl(a, make_attention(gen, B + 1, H, T))
    with pytest.raises(ValueError, match="mask"):
        attention_kl(a, a, torch.ones(B, T + 1, dtype=torch.bool))


# ----------------------------------------------------------------------------- relation_kl

DS, DT, RH = 21, 33, 3  # student and teacher widths differ; heads of width 7 and 11


@DTYPES
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_relation_kl_parity(parity, gen, rand_mask, temperature, dtype):
    mask = rand_mask((B + 1, T), gen)
    xs = torch.randn(B + 1, T, DS, generator=gen)
    xt = torch.randn(B + 1, T, DT, generator=gen) * 2
    parity(
        lambda x, y, m: relation_kl(x, y, m, num_relation_heads=RH, temperature=temperature),
        lambda x, y, m: relation_kl_ref(x, y, m, num_relation_heads=RH, temperature=temperature),
        xs,
        xt,
        mask,
        dtype=dtype,
    )


@pytest.mark.parametrize("heads,ds,dt", [(1, 37, 37), (4, 24, 40)])
def test_relation_kl_parity_other_widths(parity, gen, rand_mask, heads, ds, dt):
    mask = rand_mask((B, T), gen)
    xs, xt = torch.randn(B, T, ds, generator=gen), torch.randn(B, T, dt, generator=gen)
    parity(
        lambda x, y, m: relation_kl(x, y, m, num_relation_heads=heads),
        lambda x, y, m: relation_kl_ref(x, y, m, num_relation_heads=heads),
        xs,
        xt,
        mask,
    )
    # mask=None counts everything
    parity(
        lambda x, y: relation_kl(x, y, num_relation_heads=heads),
        lambda x, y: relation_kl_ref(x, y, num_relation_heads=heads),
        xs,
        xt,
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_relation_kl_identical_inputs_give_zero(gen, rand_mask, temperature):
    x = torch.randn(B, T, DT, generator=gen)
    out = relation_kl(x, x.clone(), rand_mask((B, T), gen), num_relation_heads=RH, temperature=temperature)
    assert abs(out.item()) < 1e-6


def test_relation_kl_all_masked_is_zero(gen, all_masked):
    xt = torch.randn(B, T, DT, generator=gen)
    none = torch.zeros(B, T, dtype=torch.bool)
    all_masked(lambda x: relation_kl(x, xt, none, num_relation_heads=RH), torch.randn(B, T, DS, generator=gen))


def _relation_padded(srows, trows, length, side, fill, gen, heads=RH):
    def pad(rows_):
        out = garbage_like((len(rows_), length, rows_[0].shape[-1]), fill, gen)
        mask = torch.zeros(len(rows_), length, dtype=torch.bool)
        for b, r in enumerate(rows_):
            sl = slice(0, r.shape[0]) if side == "right" else slice(length - r.shape[0], length)
            out[b, sl] = r
            mask[b, sl] = True
        return out, mask

    s, mask = pad(srows)
    t, _ = pad(trows)
    s.requires_grad_(True)
    out = relation_kl(s, t, mask, num_relation_heads=heads)
    (g,) = torch.autograd.grad(out, s)
    return out, g, mask


def test_relation_kl_padding_position_does_not_matter(gen):
    # Left vs right padding moves the masked keys around: the relation is over
    # counted keys only, so value and content gradients are the same.
    lengths, length = [7, 3, 10], 12
    srows = [torch.randn(n, DS, generator=gen) for n in lengths]
    trows = [torch.randn(n, DT, generator=gen) for n in lengths]
    lo, lg, lm = _relation_padded(srows, trows, length, "left", 1.0, gen)
    ro, rg, rm = _relation_padded(srows, trows, length, "right", -3.0, gen)
    assert_equal(lo, ro)
    assert_equal(lg[lm], rg[rm], atol=1e-7)
    assert (lg[~lm] == 0).all() and (rg[~rm] == 0).all()


@pytest.mark.parametrize("fill", [1e30, 3e38, float("inf"), float("-inf"), float("nan")])
def test_relation_kl_garbage_in_padding_does_not_leak(gen, fill):
    # Garbage in masked positions (huge values, inf, NaN) must change neither the
    # value nor the gradient, and must not turn the gradient into NaN.
    lengths, length = [5, 8], 10
    srows = [torch.randn(n, DS, generator=gen) for n in lengths]
    trows = [torch.randn(n, DT, generator=gen) for n in lengths]
    clean_o, clean_g, clean_m = _relation_padded(srows, trows, length, "right", 0.0, gen)
    out, g, mask = _relation_padded(srows, trows, length, "right", fill, gen)
    assert torch.isfinite(out), f"padding filled with {fill}: value {out.item()}"
    assert_equal(out, clean_o)
    bad = (~torch.isfinite(g)).sum().item()
    assert bad == 0, (
        f"padding filled with {fill}: {bad} of {g.numel()} gradient entries are NaN/inf "
        f"({(~torch.isfinite(g[mask])).sum().item()} of them at counted positions); the clean gradient is finite"
    )
    assert_equal(g[mask], clean_g[clean_m], atol=1e-7)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3).filter(lambda ls: sum(ls) > 0),
    left=st.lists(st.booleans(), min_size=3, max_size=3),
    heads=st.sampled_from([1, 2, 3]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_relation_kl_batch_is_mean_of_sequences(lengths, left, heads, temperature, seed):
    # A padded batch gives the query-weighted mean of each sequence computed alone
    # without padding: padding and batching add nothing.
    gen = torch.Generator().manual_seed(seed)
    ds, dt, length = 2 * 3 * heads, 5 * heads, max(lengths) + 1
    xs = torch.randn(len(lengths), length, ds, generator=gen)
    xt = torch.randn(len(lengths), length, dt, generator=gen)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n:
            mask[b, slice(length - n, length) if left[b] else slice(0, n)] = True
    out = relation_kl(xs, xt, mask, num_relation_heads=heads, temperature=temperature)
    total = 0.0
    for b in range(len(lengths)):
        if lengths[b]:
            alone = relation_kl(
                xs[b][mask[b]][None], xt[b][mask[b]][None], num_relation_heads=heads, temperature=temperature
            )
            total += alone.item() * lengths[b]
    assert out.item() == pytest.approx(total / sum(lengths), rel=1e-5, abs=1e-6)


def test_relation_kl_bad_arguments_raise(gen):
    xs, xt = torch.randn(B, T, DS, generator=gen), torch.randn(B, T, DT, generator=gen)
    with pytest.raises(ValueError, match="num_relation_heads"):
        relation_kl(xs, xt, num_relation_heads=2)  # divides neither 21 nor 33
    with pytest.raises(ValueError, match="num_relation_heads"):
        relation_kl(xs, torch.randn(B, T, 22, generator=gen), num_relation_heads=7)  # divides the student only
    with pytest.raises(ValueError, match="num_relation_heads"):
        relation_kl(xs, xt, num_relation_heads=0)
    with pytest.raises(ValueError, match="temperature"):
        relation_kl(xs, xt, num_relation_heads=RH, temperature=0.0)
    with pytest.raises(ValueError, match=r"\S"):
        relation_kl(xs, torch.randn(B, T + 1, DT, generator=gen), num_relation_heads=RH)
    with pytest.raises(ValueError, match=r"\S"):
        relation_kl(xs[0], xt[0], num_relation_heads=RH)  # [T, D]: no batch
    with pytest.raises(ValueError, match="mask"):
        relation_kl(xs, xt, torch.ones(B, T - 1, dtype=torch.bool), num_relation_heads=RH)
