"""Tests of lm_head_kl: the chunked LM-head loss equals kl_div on the materialised logits.

Two references: ``kl_div`` (and ``F.cross_entropy``) on ``h @ W.T + b`` with plain
autograd, which must agree to float32 rounding (1e-5 relative) for every kind,
chunk size and mask; and a naive float64 one written here, sharing no code with
the library, for forward KL and JSD with cross-entropy, biases and softcap.

Under bf16 autocast the reference logits are made as the unfused engine makes
them: the student's ``F.linear`` under autocast (bf16), the teacher's in its own
bf16 dtype outside autocast; both are then upcast for ``kl_div``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LOOSE, assert_close, assert_grad_close

from alignkd import losses
from alignkd.losses import KL_KINDS, _head_chunks, kl_div, lm_head_ce, lm_head_kl, lm_head_kl_ce, lm_head_sparse_kl
from alignkd.losses import _head_args as head_args
from alignkd.losses import lm_head as lm_head_module

# Odd sizes on purpose, student and teacher of different widths.
B, T, DS, DT, V = 3, 17, 24, 40, 123
KIND_ARGS = [
    ("forward", {}),
    ("reverse", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_forward", {"alpha": 0.35}),
    ("skew_reverse", {"alpha": 0.35}),
    ("tvd", {}),
]
KIND_IDS = [k + "".join(f"-{a}{v}" for a, v in kw.items()) for k, kw in KIND_ARGS]
# float32 against float32: only the order of the sums differs.
F32 = {"rtol": 1e-5, "atol": 1e-5}
# bf16 autocast against the unfused engine's logits: both sides make the same bf16
# logits, so the values differ by float32 summation order only (the value computed
# with float32 logits differs by ~1e-4); the head gradient is rounded to bf16 once
# per chunk here and once in the reference, ~4e-3 of its largest entry.
AUTOCAST_VALUE = {"rtol": 2e-5, "atol": 1e-6}


# ----------------------------------------------------------------------------- data and references


def make(gen, *, lead=(B, T), ds=DS, dt=DT, vs=V, vt=V, bias=True, dtype=torch.float32):
    """Student and teacher hidden states, heads and biases; the head scale gives logits of std ~3."""

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    d = {
        "hs": t(*lead, ds),
        "ws": t(vs, ds, scale=3 / ds**0.5),
        "bs": t(vs) if bias else None,
        "ht": t(*lead, dt),
        "wt": t(vt, dt, scale=3 / dt**0.5),
        "bt": t(vt) if bias else None,
    }
    d["mask"] = torch.rand(lead, generator=gen) < 0.7
    d["mask"].view(-1)[0] = True
    d["mask"].view(-1)[-1] = False
    labels = torch.randint(0, min(vs, vt), lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < 0.2] = -100
    d["labels"] = labels
    return d


def student_leaves(d):
    """Fresh leaves for the student tensors (those that get gradients)."""
    return [None if d[k] is None else d[k].detach().clone().requires_grad_(True) for k in ("hs", "ws", "bs")]


def grads_of(out, leaves):
    got = torch.autograd.grad(out, [x for x in leaves if x is not None])
    it = iter(got)
    return [None if x is None else next(it) for x in leaves]


def capped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def materialised(d, hs, ws, bs, *, vocab=None, softcap=None, ce_weight=0.0, mask="default", autocast=None, **kw):
    """The reference: kl_div (+ cross-entropy) on the full logits, plain autograd.

    Each model's logits come out of its head as the model makes them: in the inputs'
    dtype, the student's under ``autocast`` (a dtype) when given; then upcast.
    """
    mask = d["mask"] if mask == "default" else mask
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        zs = F.linear(hs, ws, bs)
    zs = capped(zs.float(), softcap)
    zt = capped(F.linear(d["ht"], d["wt"], d["bt"]).float(), softcap)
    vocab = vocab or min(zs.shape[-1], zt.shape[-1])
    zs, zt = zs[..., :vocab], zt[..., :vocab]
    out = kl_div(zs, zt, mask, **kw)
    if ce_weight:
        sel = (torch.ones_like(d["labels"], dtype=torch.bool) if mask is None else mask) & (d["labels"] >= 0)
        out = out + ce_weight * (F.cross_entropy(zs[sel], d["labels"][sel]) if sel.any() else zs.sum() * 0)
    return out


def fused(d, hs, ws, bs, *, mask="default", ce_weight=0.0, autocast=None, **kw):
    mask = d["mask"] if mask == "default" else mask
    labels = d["labels"] if ce_weight else None
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return lm_head_kl(
            hs,
            ws,
            d["ht"],
            d["wt"],
            mask,
            student_bias=bs,
            teacher_bias=d["bt"],
            labels=labels,
            ce_weight=ce_weight,
            **kw,
        )


def check_against_materialised(d, tol=F32, value_tol=None, **kw):
    a = student_leaves(d)
    out = fused(d, *a, **kw)
    assert out.dtype == torch.float32 and out.dim() == 0
    ga = grads_of(out, a)
    b = student_leaves(d)
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_tokens"}
    ref = materialised(d, *b, **ref_kw)
    gb = grads_of(ref, b)
    assert_close(out, ref, **(value_tol or tol), what="value")
    for name, x, g, r in zip(("hidden", "head", "bias"), a, ga, gb, strict=True):
        if x is not None:
            assert g.dtype == x.dtype and g.shape == x.shape, name
            assert_grad_close(g, r, **tol, what=f"{name} gradient")
    return out, ga


def bf16_teacher(d):
    """The teacher as the engine holds it under mixed precision: loaded in bf16."""
    return {**d, **{k: None if d[k] is None else d[k].bfloat16() for k in ("ht", "wt", "bt")}}


def reference_f64(d, *, kind, temperature, beta=0.5, ce_weight=0.0, softcap=None):
    """Row by row in float64 with textbook softmax, KL and cross-entropy; autograd in float64."""
    hs, ws, bs = (d[k].detach().double().requires_grad_(True) for k in ("hs", "ws", "bs"))
    ht, wt, bt = (d[k].double() for k in ("ht", "wt", "bt"))
    mask, labels = d["mask"].reshape(-1).tolist(), d["labels"].reshape(-1).tolist()
    h2s, h2t = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    kl_total, ce_total, n_kl, n_ce = 0.0, 0.0, 0, 0
    for i, keep in enumerate(mask):
        if not keep:
            continue
        zs, zt = capped(ws @ h2s[i] + bs, softcap), capped(wt @ h2t[i] + bt, softcap)
        ps, pt = torch.softmax(zs / temperature, 0), torch.softmax(zt / temperature, 0)
        if kind == "forward":
            kl = torch.sum(pt * torch.log(pt / ps))
        else:  # jsd
            m = beta * pt + (1 - beta) * ps
            kl = beta * torch.sum(pt * torch.log(pt / m)) + (1 - beta) * torch.sum(ps * torch.log(ps / m))
        kl_total, n_kl = kl_total + kl * temperature**2, n_kl + 1
        if labels[i] >= 0:
            ce_total, n_ce = ce_total - torch.log(torch.softmax(zs, 0)[labels[i]]), n_ce + 1
    out = kl_total / n_kl + ce_weight * ce_total / n_ce
    out.backward()
    return out, [hs.grad, ws.grad, bs.grad]


# ----------------------------------------------------------------------------- parity with kl_div


def test_every_kind_is_tested():
    assert {k for k, _ in KIND_ARGS} == set(KL_KINDS)


# (chunk_tokens, FLOAT32_BLOCK_ELEMENTS): one block in chunks of 1, 7 and the default; blocks of
# 16 rows (2000 // 123) in chunks of 7 and of 1, ragged at the end.
FLOAT32_BLOCKING = [(1, None), (7, None), (None, None), (7, 2000), (1, 2000)]


@pytest.mark.parametrize(
    "chunk_tokens,block", FLOAT32_BLOCKING, ids=[f"chunk{c}-block{b}" for c, b in FLOAT32_BLOCKING]
)
@pytest.mark.parametrize("kind,kw", KIND_ARGS, ids=KIND_IDS)
def test_parity_with_kl_div_on_logits(gen, kind, kw, chunk_tokens, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(_head_chunks, "FLOAT32_BLOCK_ELEMENTS", block)
    check_against_materialised(make(gen), kind=kind, temperature=1.5, chunk_tokens=chunk_tokens, **kw)


@pytest.mark.parametrize("kind,kw", KIND_ARGS, ids=KIND_IDS)
def test_parity_bf16(gen, kind, kw):
    # bf16 inputs without autocast: both sides run the heads in bf16, as a bf16
    # model's own head does; the maths is float32 and the gradients come back in bf16.
    check_against_materialised(
        make(gen, dtype=torch.bfloat16), tol=LOOSE, kind=kind, temperature=2.0, chunk_tokens=7, **kw
    )


@pytest.mark.parametrize("chunk_tokens,block", [(5, None), (None, None), (5, 2000)])
@pytest.mark.parametrize("kind", ["forward", "jsd", "tvd"])
def test_cross_entropy_is_added_in_the_same_pass(gen, kind, chunk_tokens, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(_head_chunks, "FLOAT32_BLOCK_ELEMENTS", block)
    check_against_materialised(make(gen), kind=kind, temperature=2.0, ce_weight=0.7, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_softcap_equals_kl_div_on_capped_logits(gen, kind):
    check_against_materialised(make(gen), kind=kind, temperature=1.3, softcap=2.5, ce_weight=0.5, chunk_tokens=4)


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_padded_heads_use_the_shared_columns(gen, kind):
    d = make(gen, vs=130, vt=123)
    _, (_, g_head, g_bias) = check_against_materialised(d, kind=kind, vocab=123, ce_weight=0.3, chunk_tokens=6)
    assert (g_head[123:] == 0).all() and (g_bias[123:] == 0).all()
    # vocab below both sizes: both sides are cut
    _, (_, g_head, _) = check_against_materialised(d, kind=kind, vocab=100, chunk_tokens=6)
    assert (g_head[100:] == 0).all()


def test_default_chunk_size_splits_large_inputs(gen, monkeypatch):
    # 1000 elements per chunk at V = 123: 8 rows per chunk with a ragged last one.
    monkeypatch.setattr(head_args, "CHUNK_ELEMENTS", 1000)
    check_against_materialised(make(gen), kind="jsd", ce_weight=0.2)


@pytest.mark.parametrize("kind", ["forward", "skew_reverse"])
def test_flat_inputs_and_no_mask(gen, kind):
    d = make(gen, lead=(29,), bias=False)
    check_against_materialised(d, kind=kind, chunk_tokens=4)
    check_against_materialised(d, kind=kind, chunk_tokens=4, mask=None, ce_weight=0.4)


def test_tied_embedding_gradient_adds_up(gen):
    # The student's head is its input embedding: the gradient through the lookup
    # and the one through the head add up, as with the materialised logits.
    d = make(gen, bias=False)
    ids = torch.randint(0, V, (B, T), generator=gen)
    proj = torch.randn(DS, DS, generator=gen) / DS**0.5

    def run(loss):
        emb = d["ws"].detach().clone().requires_grad_(True)
        hidden = torch.tanh(emb[ids] @ proj) * 3
        (g,) = torch.autograd.grad(loss(hidden, emb), emb)
        return g

    got = run(lambda h, e: lm_head_kl(h, e, d["ht"], d["wt"], d["mask"], kind="reverse", chunk_tokens=5))
    ref = run(lambda h, e: kl_div(h @ e.T, d["ht"] @ d["wt"].T, d["mask"], kind="reverse"))
    assert_grad_close(got, ref, **F32, what="tied embedding gradient")


# ----------------------------------------------------------------------------- float64 reference


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("jsd", 0.3)])
def test_float64_reference(gen, kind, beta):
    d = make(gen)
    ref, ref_grads = reference_f64(d, kind=kind, temperature=1.7, beta=beta, ce_weight=0.4, softcap=4.0)
    a = student_leaves(d)
    out = fused(d, *a, kind=kind, temperature=1.7, beta=beta, ce_weight=0.4, softcap=4.0, chunk_tokens=5)
    got = grads_of(out, a)
    assert_close(out, ref, **F32, what="value")
    for name, g, r in zip(("hidden", "head", "bias"), got, ref_grads, strict=True):
        assert_grad_close(g, r, **F32, what=f"{name} gradient")


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", KL_KINDS)
def test_identical_models_give_zero(gen, kind):
    d = make(gen, dt=DS)
    out = lm_head_kl(d["hs"], d["ws"], d["hs"].clone(), d["ws"].clone(), d["mask"], kind=kind, chunk_tokens=5)
    assert abs(out.item()) < 1e-6


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("kind", KL_KINDS)
def test_all_masked_gives_zero_and_zero_gradients(gen, kind, ce_weight):
    d = make(gen)
    a = student_leaves(d)
    out = fused(d, *a, kind=kind, ce_weight=ce_weight, mask=torch.zeros(B, T, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.item() == 0.0
    for g in grads_of(out, a):
        assert torch.isfinite(g).all() and (g == 0).all()


def test_no_labelled_rows_gives_kl_alone(gen):
    d = make(gen)
    d["labels"] = torch.full((B, T), -100)
    a = student_leaves(d)
    with_ce = fused(d, *a, ce_weight=0.9, chunk_tokens=4)
    without = fused(d, *a, chunk_tokens=4)
    assert torch.isfinite(with_ce) and with_ce.item() == without.item()


def test_padding_content_does_not_matter(gen):
    # NaN/inf in the hidden states of positions that are not counted never leak.
    d = make(gen)
    a = student_leaves(d)
    clean = fused(d, *a, kind="jsd", ce_weight=0.3, chunk_tokens=4)
    g_clean = grads_of(clean, a)
    d["hs"][~d["mask"]] = float("nan")
    d["ht"][~d["mask"]] = float("inf")
    b = student_leaves(d)
    dirty = fused(d, *b, kind="jsd", ce_weight=0.3, chunk_tokens=4)
    g_dirty = grads_of(dirty, b)
    assert dirty.item() == clean.item()
    for g, r in zip(g_dirty, g_clean, strict=True):
        assert torch.equal(g, r)
    assert (g_dirty[0][~d["mask"]] == 0).all()


def test_teacher_gets_no_gradient_and_grad_output_scales(gen):
    d = make(gen)
    d["ht"].requires_grad_(True)
    d["wt"].requires_grad_(True)
    a = student_leaves(d)
    out = fused(d, *a, kind="forward", ce_weight=0.5, chunk_tokens=6)
    g1 = grads_of(out, a)
    out2 = fused(d, *a, kind="forward", ce_weight=0.5, chunk_tokens=6)
    (2.5 * out2).backward()
    assert d["ht"].grad is None and d["wt"].grad is None
    for x, g in zip(a, g1, strict=True):
        torch.testing.assert_close(x.grad, 2.5 * g)


def test_no_grad_gives_the_same_value(gen):
    d = make(gen)
    a = student_leaves(d)
    out = fused(d, *a, kind="skew_forward", ce_weight=0.2, chunk_tokens=8)
    with torch.no_grad():
        quiet = fused(d, *a, kind="skew_forward", ce_weight=0.2, chunk_tokens=8)
    assert quiet.grad_fn is None
    assert quiet.item() == out.item()


# ----------------------------------------------------------------------------- autocast


# (chunk_tokens, BLOCK_ELEMENTS): one block of all rows in chunks of 1, 7 and the
# default; blocks of 16 rows (2000 // 123) in chunks of 7, both ragged at the end.
BLOCKING = [(1, None), (7, None), (None, None), (7, 2000)]


@pytest.mark.parametrize("chunk_tokens,block", BLOCKING, ids=[f"chunk{c}-block{b}" for c, b in BLOCKING])
@pytest.mark.parametrize("kind,kw", KIND_ARGS, ids=KIND_IDS)
def test_parity_under_bf16_autocast(gen, kind, kw, chunk_tokens, block, monkeypatch):
    # float32 student (as under autocast: float32 weights and hidden states), bf16 teacher.
    if block is not None:
        monkeypatch.setattr(_head_chunks, "BLOCK_ELEMENTS", block)
    d = bf16_teacher(make(gen))
    check_against_materialised(
        d,
        tol=LOOSE,
        value_tol=AUTOCAST_VALUE,
        autocast=torch.bfloat16,
        kind=kind,
        temperature=1.5,
        ce_weight=0.3,
        chunk_tokens=chunk_tokens,
        **kw,
    )


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_bf16_autocast_with_softcap_padded_heads_and_default_chunks(gen, kind, monkeypatch):
    monkeypatch.setattr(head_args, "CHUNK_ELEMENTS", 1000)  # 8 rows per chunk at vocab 123
    monkeypatch.setattr(_head_chunks, "BLOCK_ELEMENTS", 2000)  # ~16 rows per block: two chunks, the last ragged
    d = bf16_teacher(make(gen, vs=130, vt=123, lead=(5, 13)))
    _, (_, g_head, g_bias) = check_against_materialised(
        d,
        tol=LOOSE,
        value_tol=AUTOCAST_VALUE,
        autocast=torch.bfloat16,
        kind=kind,
        temperature=1.3,
        softcap=2.5,
        ce_weight=0.5,
        vocab=123,
    )
    assert (g_head[123:] == 0).all() and (g_bias[123:] == 0).all()


def test_autocast_sets_the_matmul_dtype(gen):
    # Under autocast both heads run in its dtype: the value is bit for bit that of the
    # same call on bf16 copies without autocast, and not the float32 one.
    d = make(gen)
    low = {k: v.bfloat16() if k in ("hs", "ws", "bs", "ht", "wt", "bt") else v for k, v in d.items()}
    kw = {"kind": "skew_forward", "ce_weight": 0.2, "chunk_tokens": 8}
    cast = fused(d, *student_leaves(d), autocast=torch.bfloat16, **kw)
    plain_bf16 = fused(low, *student_leaves(low), **kw)
    plain_f32 = fused(d, *student_leaves(d), **kw)
    assert cast.dtype == torch.float32
    assert cast.item() == plain_bf16.item() and cast.item() != plain_f32.item()
    with torch.autocast("cpu", dtype=torch.float16):
        assert lm_head_module.matmul_dtype(d["hs"]) == torch.float16
    assert lm_head_module.matmul_dtype(d["hs"]) == torch.float32
    assert lm_head_module.matmul_dtype(d["hs"].double()) == torch.float32


def test_float16_autocast_keeps_the_gradient_of_rare_tokens(gen):
    # A mean over ~1400 tokens: the gradient w.r.t. the logits of a token that both
    # models find unlikely (bias -8) is ~1e-9, below fp16's smallest subnormal
    # once divided by the count; unscaled, its head row came out 15 % off.
    d = make(gen, lead=(40, 50))
    d["bs"][5], d["bt"][5] = -8.0, -7.5
    d["labels"][d["labels"] == 5] = 6  # no label on it either (a label's -1 would dominate its row)
    a = student_leaves(d)
    out = fused(d, *a, autocast=torch.float16, kind="forward", ce_weight=0.3, chunk_tokens=64)
    ga = grads_of(out, a)
    b = student_leaves(d)
    ref = materialised(d, *b, kind="forward", ce_weight=0.3)  # float32 logits
    gb = grads_of(ref, b)
    assert_close(out, ref, rtol=1e-3, atol=1e-5, what="value")
    for name, g, r in zip(("hidden", "head", "bias"), ga, gb, strict=True):
        assert_grad_close(g, r, rtol=1e-2, atol=1e-2, what=f"{name} gradient")
    row_error = (ga[1] - gb[1]).norm(dim=1) / gb[1].norm(dim=1)
    assert row_error[5] < 1e-2, f"rare token's head row is {row_error[5].item():.1%} off"


def test_lm_head_ce_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 11, 24, generator=g)
    w = torch.randn(130, 24, generator=g) * 0.3
    labels = torch.randint(0, 123, (3, 11), generator=g)
    labels[1, 3:] = -100
    hf, wf = (t.clone().requires_grad_(True) for t in (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_head_ce(hf, wf, labels, vocab=123, chunk_tokens=4)
    got.backward()
    hr, wr = (t.clone().requires_grad_(True) for t in (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.linear(hr, wr)[..., :123]
    ref = F.cross_entropy(z.float().reshape(-1, 123), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    assert got.dtype == torch.float32
    assert_close(got, ref, **AUTOCAST_VALUE, what="value")
    for what, mine, want in (("hidden", hf, hr), ("head", wf, wr)):
        assert mine.grad.dtype == torch.float32
        assert_grad_close(mine.grad, want.grad, **LOOSE, what=f"{what} gradient")


# ----------------------------------------------------------------------------- KL and CE from one pass


def reference_kl_and_ce(d, hs, ws, bs, *, vocab=None, softcap=None, autocast=None, **kw):
    """kl_div and F.cross_entropy on the full logits (the CE over mask & labelled positions)."""
    kl = materialised(d, hs, ws, bs, vocab=vocab, softcap=softcap, autocast=autocast, **kw)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        zs = F.linear(hs, ws, bs)
    zs = capped(zs.float(), softcap)[..., : vocab or zs.shape[-1]]
    sel = d["mask"] & (d["labels"] >= 0)
    ce = F.cross_entropy(zs[sel], d["labels"][sel]) if sel.any() else zs.sum() * 0
    return kl, ce


def kl_and_ce(d, hs, ws, bs, autocast=None, **kw):
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return lm_head_kl_ce(
            hs, ws, d["ht"], d["wt"], d["mask"], d["labels"], student_bias=bs, teacher_bias=d["bt"], **kw
        )


SPLIT_CASES = [  # (kind, autocast, chunk_tokens, BLOCK_ELEMENTS and FLOAT32_BLOCK_ELEMENTS, softcap)
    ("forward", None, 5, None, None),
    ("forward", None, 5, 2000, 2.5),
    ("jsd", None, 3, 2000, None),
    ("jsd", None, None, None, 2.5),
    ("reverse", torch.bfloat16, 7, None, None),
    ("forward", torch.bfloat16, 7, 2000, 2.5),
    ("tvd", torch.bfloat16, 1, None, None),
]


@pytest.mark.parametrize("kind,autocast,chunk_tokens,block,softcap", SPLIT_CASES)
def test_kl_and_ce_from_one_pass_have_their_own_gradients(
    gen, kind, autocast, chunk_tokens, block, softcap, monkeypatch
):
    if block is not None:
        monkeypatch.setattr(_head_chunks, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(_head_chunks, "FLOAT32_BLOCK_ELEMENTS", block)
    d = make(gen, vs=130, vt=123)
    if autocast is not None:
        d = bf16_teacher(d)
    kw = {"kind": kind, "temperature": 1.7, "softcap": softcap, "vocab": 123}
    value_tol, grad_tol = (F32, F32) if autocast is None else (AUTOCAST_VALUE, LOOSE)
    # Each output alone, then a weighted sum (as GradNorm's per-term gradients, then the step's backward).
    for weights in ((1.0, 0.0), (0.0, 1.0), (0.7, 1.9)):
        a = student_leaves(d)
        kl, ce = kl_and_ce(d, *a, autocast=autocast, chunk_tokens=chunk_tokens, **kw)
        assert kl.dtype == ce.dtype == torch.float32
        ga = grads_of(weights[0] * kl + weights[1] * ce, a)
        b = student_leaves(d)
        kl_ref, ce_ref = reference_kl_and_ce(d, *b, autocast=autocast, **kw)
        gb = grads_of(weights[0] * kl_ref + weights[1] * ce_ref, b)
        assert_close(kl, kl_ref, **value_tol, what="kl")
        assert_close(ce, ce_ref, **value_tol, what="ce")
        for name, g, r in zip(("hidden", "head", "bias"), ga, gb, strict=True):
            assert_grad_close(g, r, **grad_tol, what=f"{name} gradient at weights {weights}")
        assert (ga[1][123:] == 0).all()


def test_kl_and_ce_equal_the_separate_calls(gen):
    d = make(gen)
    a = student_leaves(d)
    kl, ce = kl_and_ce(d, *a, kind="jsd", chunk_tokens=6)
    (kl + ce).backward()
    b = student_leaves(d)
    kl_alone = lm_head_kl(
        b[0], b[1], d["ht"], d["wt"], d["mask"], kind="jsd", student_bias=b[2], teacher_bias=d["bt"], chunk_tokens=6
    )
    ce_alone = lm_head_ce(b[0], b[1], torch.where(d["mask"], d["labels"], -100), bias=b[2], chunk_tokens=6)
    (kl_alone + ce_alone).backward()
    assert kl.item() == kl_alone.item()
    assert_close(ce, ce_alone, **F32, what="ce")
    for x, y in zip(a, b, strict=True):
        assert_grad_close(x.grad, y.grad, **F32, what="gradient")


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["forward", "skew_reverse"])
def test_kl_and_ce_equal_lm_head_kl_and_lm_head_ce_at_any_temperature(gen, kind, autocast):
    # What the trainer relies on when one walk serves a KL term and a CE term: the KL is the KL
    # term's lm_head_kl (temperature, softcap, vocab), the CE is lm_head_ce on the same labels at
    # temperature 1, counted over the labelled positions within the mask.
    d = make(gen, vs=130, vt=123)
    if autocast is not None:
        d = bf16_teacher(d)
    kw = {"softcap": 3.0, "vocab": 123, "chunk_tokens": 5}
    labels = torch.where(d["mask"], d["labels"], -100)
    value_tol, grad_tol = (F32, F32) if autocast is None else (AUTOCAST_VALUE, LOOSE)
    for weights in ((1.0, 0.0), (0.0, 1.0), (0.6, 1.3)):
        a = student_leaves(d)
        kl, ce = kl_and_ce(d, *a, autocast=autocast, kind=kind, temperature=2.5, **kw)
        ga = grads_of(weights[0] * kl + weights[1] * ce, a)
        b = student_leaves(d)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            kl_alone = lm_head_kl(
                b[0],
                b[1],
                d["ht"],
                d["wt"],
                d["mask"],
                kind=kind,
                temperature=2.5,
                student_bias=b[2],
                teacher_bias=d["bt"],
                **kw,
            )
            ce_alone = lm_head_ce(b[0], b[1], labels, bias=b[2], **kw)
        gb = grads_of(weights[0] * kl_alone + weights[1] * ce_alone, b)
        assert kl.item() == kl_alone.item()
        assert_close(ce, ce_alone, **value_tol, what="ce")
        for name, g, r in zip(("hidden", "head", "bias"), ga, gb, strict=True):
            assert_grad_close(g, r, **grad_tol, what=f"{name} gradient at weights {weights}")


def test_kl_and_ce_needs_labels(gen):
    d = make(gen)
    with pytest.raises(ValueError, match="lm_head_kl_ce: labels are required") as e:
        lm_head_kl_ce(d["hs"], d["ws"], d["ht"], d["wt"], d["mask"], None)
    assert "\n" not in str(e.value)


def test_kl_and_ce_with_nothing_counted_are_zero_with_zero_gradients(gen):
    d = make(gen)
    d["mask"] = torch.zeros(B, T, dtype=torch.bool)
    a = student_leaves(d)
    kl, ce = kl_and_ce(d, *a)
    assert kl.item() == 0.0 and ce.item() == 0.0
    for g in grads_of(kl + 2 * ce, a):
        assert torch.isfinite(g).all() and (g == 0).all()
    d = make(gen)
    d["labels"] = torch.full((B, T), -100)
    kl, ce = kl_and_ce(d, *student_leaves(d))
    assert ce.item() == 0.0 and kl.item() > 0


# ----------------------------------------------------------------------------- errors


def _call(d, **kw):
    args = {
        "student_hidden": d["hs"],
        "student_head": d["ws"],
        "teacher_hidden": d["ht"],
        "teacher_head": d["wt"],
        "mask": d["mask"],
    }
    args.update(kw)
    return lm_head_kl(**args)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"kind": "backward"}, "lm_head_kl: unknown kind"),
        ({"kind": "jsd", "beta": 1.0}, "lm_head_kl: jsd needs"),
        ({"temperature": 0.0}, "temperature"),
        ({"student_head": torch.zeros(V, DS + 1)}, "student head has shape"),
        ({"teacher_head": torch.zeros(V)}, "teacher head has shape"),
        ({"teacher_hidden": torch.zeros(B, T + 1, DT)}, "different positions"),
        ({"student_hidden": torch.zeros(DS)}, "hidden states have shape"),
        ({"student_bias": torch.zeros(V + 1)}, "student bias has shape"),
        ({"vocab": V + 1}, "vocab"),
        ({"vocab": 0}, "vocab"),
        ({"softcap": 0.0}, "softcap"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"ce_weight": 0.5}, "needs labels"),
        ({"ce_weight": -1.0, "labels": torch.zeros(B, T, dtype=torch.long)}, "ce_weight"),
        ({"ce_weight": 1.0, "labels": torch.zeros(B * T, dtype=torch.long)}, "labels have shape"),
        ({"ce_weight": 1.0, "labels": torch.zeros(B, T)}, "integer"),
        ({"ce_weight": 1.0, "labels": torch.full((B, T), V)}, "out of range"),
        ({"mask": torch.ones(B, dtype=torch.bool)}, "mask has shape"),
    ],
)
def test_bad_arguments_raise_one_line(gen, bad, match):
    with pytest.raises(ValueError, match=match) as e:
        _call(make(gen), **bad)
    assert "\n" not in str(e.value)


def _public_call(name, d, **bad):
    """``name`` (a public LM-head loss) on the data of ``make``, with ``bad`` replacing some arguments."""
    top = (torch.zeros(B, T, 4, dtype=torch.long), torch.full((B, T, 4), -2.0), torch.full((B, T), -1.0))
    if name == "lm_head_ce":
        args = {"hidden": d["hs"], "head": d["ws"], "labels": d["labels"], "bias": d["bs"]}
        return lm_head_ce(**{**args, **bad})
    if name == "lm_head_sparse_kl":
        args = dict(zip(("teacher_ids", "teacher_logprobs", "teacher_tail"), top, strict=True))
        args.update(student_hidden=d["hs"], student_head=d["ws"], mask=d["mask"], student_bias=d["bs"])
        return lm_head_sparse_kl(**{**args, **bad})
    args = {
        "student_hidden": d["hs"],
        "student_head": d["ws"],
        "teacher_hidden": d["ht"],
        "teacher_head": d["wt"],
        "mask": d["mask"],
        "labels": d["labels"],
        "student_bias": d["bs"],
        "teacher_bias": d["bt"],
    }
    if name == "lm_head_kl":
        return lm_head_kl(**{**args, "ce_weight": 0.5, **bad})
    return lm_head_kl_ce(**{**args, **bad})


# Each public function with one bad argument at a time; the checks they share (divergence,
# shapes, labels, chunking) must report under the name of the function the user called.
NAMED_ERRORS = [
    *[
        (fn, bad)
        for fn in ("lm_head_kl", "lm_head_kl_ce", "lm_head_sparse_kl")
        for bad in (
            {"kind": "backward"},
            {"kind": "jsd", "beta": 1.0},
            {"kind": "skew_forward", "alpha": 1.0},
            {"temperature": 0.0},
            {"student_head": torch.zeros(V, DS + 1)},
            {"student_bias": torch.zeros(V + 1)},
            {"mask": torch.ones(B, dtype=torch.bool)},
            {"vocab": V + 1},
            {"softcap": 0.0},
            {"chunk_tokens": 0},
        )
    ],
    *[
        (fn, bad)
        for fn in ("lm_head_kl", "lm_head_kl_ce")
        for bad in (
            {"teacher_head": torch.zeros(V)},
            {"teacher_hidden": torch.zeros(B, T + 1, DT)},
            {"labels": torch.zeros(B * T, dtype=torch.long)},
            {"labels": torch.zeros(B, T)},
            {"labels": torch.full((B, T), V)},
        )
    ],
    ("lm_head_sparse_kl", {"teacher_tail": torch.zeros(B)}),
    *[
        ("lm_head_ce", bad)
        for bad in (
            {"head": torch.zeros(V, DS + 1)},
            {"bias": torch.zeros(V + 1)},
            {"hidden": torch.zeros(DS)},
            {"labels": torch.zeros(B * T, dtype=torch.long)},
            {"labels": torch.zeros(B, T)},
            {"labels": torch.full((B, T), V)},
            {"vocab": 0},
            {"softcap": -1.0},
            {"chunk_tokens": 0},
        )
    ],
]


@pytest.mark.parametrize(
    "name,bad", NAMED_ERRORS, ids=[f"{n}-{'-'.join(b)}-{i}" for i, (n, b) in enumerate(NAMED_ERRORS)]
)
def test_errors_name_the_function_called(gen, name, bad):
    with pytest.raises(ValueError) as e:
        _public_call(name, make(gen), **bad)
    assert str(e.value).startswith(f"{name}: "), str(e.value)
    assert "\n" not in str(e.value)


def test_every_public_lm_head_loss_has_its_errors_named():
    assert {n for n, _ in NAMED_ERRORS} == {n for n in losses.__all__ if n.startswith("lm_head_")}


# ----------------------------------------------------------------------------- cross-entropy alone


@pytest.mark.parametrize("chunk,block", [(1, None), (5, None), (None, None), (5, 1500)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lm_head_ce_matches_cross_entropy_on_full_logits(chunk, block, softcap, monkeypatch):
    from alignkd.losses import lm_head_ce

    if block is not None:  # blocks of 12 rows (1500 // 123) in chunks of 5, the first partly unlabelled
        monkeypatch.setattr(_head_chunks, "FLOAT32_BLOCK_ELEMENTS", block)

    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 11, 24, generator=g, dtype=torch.float64)
    w = torch.randn(130, 24, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(130, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, 123, (3, 11), generator=g)
    labels[0, :4] = -100
    hf, wf, bf = (t.float().requires_grad_(True) for t in (h, w, b))
    got = lm_head_ce(hf, wf, labels, bias=bf, softcap=softcap, vocab=123, chunk_tokens=chunk)
    got.backward()
    hr, wr, br = (t.clone().requires_grad_(True) for t in (h, w, b))
    z = (hr @ wr.T + br)[..., :123]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = torch.nn.functional.cross_entropy(z.reshape(-1, 123), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for mine, want in ((hf, hr), (wf, wr), (bf, br)):
        torch.testing.assert_close(mine.grad.double(), want.grad, rtol=1e-5, atol=1e-6 * want.grad.abs().max().item())
    assert wf.grad[123:].abs().sum() == 0  # padded rows get nothing


def test_lm_head_ce_with_no_labelled_position_is_zero_with_zero_gradients():
    from alignkd.losses import lm_head_ce

    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    out = lm_head_ce(h, w, torch.full((2, 5), -100))
    out.backward()
    assert out.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
