"""Tests of the feature losses (hidden_mse, hidden_cosine, hidden_standardized_mse,
info_nce) against the spec.

The references loop over positions in float64 with textbook formulas (dot
products, square roots, a hand-written logsumexp) and share no code with the
implementation (no F.layer_norm, F.normalize, F.cross_entropy).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_equal, pad_rows

from alignkd.losses import hidden_cosine, hidden_mse, hidden_standardized_mse, info_nce

B, T, D = 3, 17, 37  # odd sizes on purpose
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


# ----------------------------------------------------------------------------- references


def counted_rows(x: torch.Tensor, mask) -> list[torch.Tensor]:
    """The feature vectors of the counted positions, in row-major order."""
    flat = x.reshape(-1, x.shape[-1])
    keep = [True] * flat.shape[0] if mask is None else mask.reshape(-1).tolist()
    return [flat[i] for i, k in enumerate(keep) if k]


def mean_ref(terms: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not terms:
        return like.sum() * 0.0
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total / len(terms)


def hidden_mse_ref(s, t, mask=None):
    pairs = zip(counted_rows(s, mask), counted_rows(t, mask), strict=True)
    return mean_ref([torch.sum((a - b) ** 2) / a.shape[0] for a, b in pairs], s)


def hidden_cosine_ref(s, t, mask=None):
    pairs = zip(counted_rows(s, mask), counted_rows(t, mask), strict=True)
    return mean_ref(
        [1 - torch.sum(a * b) / (torch.sqrt(torch.sum(a * a)) * torch.sqrt(torch.sum(b * b))) for a, b in pairs], s
    )


def standardize_ref(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = v.sum() / v.shape[0]
    var = ((v - mu) ** 2).sum() / v.shape[0]  # biased, as in layer norm
    return (v - mu) / torch.sqrt(var + eps)


def hidden_standardized_mse_ref(s, t, mask=None):
    pairs = zip(counted_rows(s, mask), counted_rows(t, mask), strict=True)
    return mean_ref([torch.sum((standardize_ref(a) - standardize_ref(b)) ** 2) / a.shape[0] for a, b in pairs], s)


def logsumexp_ref(z: torch.Tensor) -> torch.Tensor:
    m = z.max().detach()
    return m + torch.log(torch.sum(torch.exp(z - m)))


def info_nce_rows_ref(srows, trows, temperature, symmetric):
    if not srows:
        return None
    unit = lambda v: v / torch.sqrt(torch.sum(v * v))  # noqa: E731
    s = [unit(v) for v in srows]
    t = [unit(v) for v in trows]
    n = len(s)
    scores = [[torch.sum(s[i] * t[j]) / temperature for j in range(n)] for i in range(n)]
    # Row i of the score matrix: student i against every teacher; its own position is the positive.
    losses = [logsumexp_ref(torch.stack(scores[i])) - scores[i][i] for i in range(n)]
    loss = sum(losses[1:], losses[0]) / n
    if symmetric:
        # Rows of scores^T: teacher i against every student.
        col = [logsumexp_ref(torch.stack([scores[j][i] for j in range(n)])) - scores[i][i] for i in range(n)]
        loss = 0.5 * (loss + sum(col[1:], col[0]) / n)
    return loss


def info_nce_ref(s, t, mask=None, *, temperature=0.1, symmetric=False):
    out = info_nce_rows_ref(counted_rows(s, mask), counted_rows(t, mask), temperature, symmetric)
    return s.sum() * 0.0 if out is None else out


HIDDEN = [
    (hidden_mse, hidden_mse_ref),
    (hidden_cosine, hidden_cosine_ref),
    (hidden_standardized_mse, hidden_standardized_mse_ref),
]
HIDDEN_IDS = ["mse", "cosine", "standardized_mse"]
ALL_FNS = [f for f, _ in HIDDEN] + [info_nce]
ALL_IDS = HIDDEN_IDS + ["info_nce"]


def feats(gen, *shape, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=gen) * scale + offset


# ----------------------------------------------------------------------------- parity


@DTYPES
@pytest.mark.parametrize("fn,ref", HIDDEN, ids=HIDDEN_IDS)
def test_hidden_parity_btd(parity, gen, rand_mask, fn, ref, dtype):
    # Teacher on another scale and offset: standardisation and cosine must not care,
    # mse must.
    s, t = feats(gen, B, T, D), feats(gen, B, T, D, scale=3.0, offset=0.5)
    parity(fn, ref, s, t, rand_mask((B, T), gen), dtype=dtype)


@DTYPES
@pytest.mark.parametrize("fn,ref", HIDDEN, ids=HIDDEN_IDS)
def test_hidden_parity_nd(parity, gen, rand_mask, fn, ref, dtype):
    n = 41
    s, t = feats(gen, n, D), feats(gen, n, D, scale=2.0)
    parity(fn, ref, s, t, rand_mask((n,), gen), dtype=dtype)


@pytest.mark.parametrize("fn,ref", HIDDEN, ids=HIDDEN_IDS)
def test_hidden_mask_none(parity, gen, fn, ref):
    s, t = feats(gen, 2, 5, 11), feats(gen, 2, 5, 11)
    parity(lambda x, y: fn(x, y), lambda x, y: ref(x, y), s, t)


def test_standardized_mse_on_large_magnitude_features(parity, gen):
    # The documented use: a few channels in the hundreds on one side.
    s = feats(gen, B, T, D)
    t = feats(gen, B, T, D)
    t[..., :3] *= 300.0
    parity(hidden_standardized_mse, hidden_standardized_mse_ref, s, t, None)


@DTYPES
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_parity_btd(parity, gen, rand_mask, temperature, symmetric, dtype):
    s, t = feats(gen, B, T, D), feats(gen, B, T, D)
    t = t + 0.5 * s  # correlated, so the positives stand out and the loss is not flat
    parity(
        lambda x, y, m: info_nce(x, y, m, temperature=temperature, symmetric=symmetric),
        lambda x, y, m: info_nce_ref(x, y, m, temperature=temperature, symmetric=symmetric),
        s,
        t,
        rand_mask((B, T), gen),
        dtype=dtype,
    )


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_info_nce_parity_nd(parity, gen, rand_mask, symmetric):
    n = 29
    s, t = feats(gen, n, D), feats(gen, n, D)
    parity(
        lambda x, y, m: info_nce(x, y, m, temperature=0.2, symmetric=symmetric),
        lambda x, y, m: info_nce_ref(x, y, m, temperature=0.2, symmetric=symmetric),
        s,
        t,
        rand_mask((n,), gen),
    )
    # mask=None counts every row.
    parity(
        lambda x, y: info_nce(x, y, temperature=0.2, symmetric=symmetric),
        lambda x, y: info_nce_ref(x, y, temperature=0.2, symmetric=symmetric),
        s,
        t,
    )


@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_float64_and_bf16_inputs_give_float32(gen, fn):
    s, t = feats(gen, 2, 4, 6), feats(gen, 2, 4, 6)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert fn(s.to(dtype), t.to(dtype)).dtype == torch.float32


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("fn", [f for f, _ in HIDDEN], ids=HIDDEN_IDS)
def test_hidden_identical_inputs_give_zero(gen, rand_mask, fn):
    x = feats(gen, B, T, D, scale=5.0)
    out = fn(x, x.clone(), rand_mask((B, T), gen))
    assert abs(out.item()) < 1e-6, f"{fn.__name__} of identical inputs is {out.item()}"


def test_cosine_ignores_positive_scale_and_standardized_ignores_affine(gen, rand_mask):
    s, t = feats(gen, B, T, D), feats(gen, B, T, D)
    mask = rand_mask((B, T), gen)
    scale = torch.rand(B, T, 1, generator=gen) * 10 + 0.1  # per-position positive scale
    assert_equal(hidden_cosine(s * scale, t, mask), hidden_cosine(s, t, mask), atol=1e-5)
    # eps=1e-5 makes standardisation only approximately scale invariant: keep the
    # features' variance well above eps.
    assert_equal(hidden_standardized_mse(s * scale + 7.0, t, mask), hidden_standardized_mse(s, t, mask), atol=1e-4)


def test_standardized_mse_uses_biased_variance_and_eps(parity):
    # A small hand example: D=2, rows [a, b] standardise to [-1, 1] * |a-b|/2 / sqrt((a-b)^2/4 + eps).
    s = torch.tensor([[0.0, 2.0], [1.0, 1.001]])
    t = torch.tensor([[3.0, 1.0], [5.0, 5.0]])

    def z(a, b):
        half = abs(a - b) / 2
        c = half / math.sqrt(half**2 + 1e-5)
        return (-c, c) if a < b else (c, -c)

    expected = 0.0
    for (a, b), (c, d) in zip(s.tolist(), t.tolist(), strict=True):
        (za, zb), (zc, zd) = z(a, b), z(c, d)  # a constant row (c == d) standardises to 0
        expected += ((za - zc) ** 2 + (zb - zd) ** 2) / 2
    expected /= 2
    assert hidden_standardized_mse(s, t).item() == pytest.approx(expected, rel=1e-4)


ALL_MASKED_CASES = [
    (hidden_mse, {}),
    (hidden_cosine, {}),
    (hidden_standardized_mse, {}),
    (info_nce, {}),
    (info_nce, {"symmetric": True}),
    (info_nce, {"max_tokens": 1}),
    (info_nce, {"max_tokens": 5, "symmetric": True}),
]


@pytest.mark.parametrize(
    "fn,kw",
    ALL_MASKED_CASES,
    ids=[f.__name__ + "".join(f"-{k}{v}" for k, v in kw.items()) for f, kw in ALL_MASKED_CASES],
)
def test_all_masked_is_zero(gen, all_masked, fn, kw):
    s, t = feats(gen, B, T, D), feats(gen, B, T, D)
    all_masked(lambda x: fn(x, t, torch.zeros(B, T, dtype=torch.bool), **kw), s)
    all_masked(lambda x: fn(x, t[0], torch.zeros(T, dtype=torch.bool), **kw), s[0])


@pytest.mark.parametrize("fill", [1e30, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_padding_position_and_content_do_not_matter(gen, fn, fill):
    lengths, length = [4, 9, 1], 11
    srows = [feats(gen, n, D) for n in lengths]
    trows = [feats(gen, n, D, scale=2.0) for n in lengths]
    results = []
    for side in ("left", "right"):
        s, mask = pad_rows(srows, length, side, fill, gen)
        t, _ = pad_rows(trows, length, side, fill, gen)
        s.requires_grad_(True)
        out = fn(s, t, mask)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out), f"padding filled with {fill} gives {out.item()}"
        assert torch.isfinite(g).all(), f"padding filled with {fill} gives a non-finite gradient"
        assert (g[~mask] == 0).all()
        results.append((out, g[mask]))
    assert_equal(results[0][0], results[1][0])
    assert_equal(results[0][1], results[1][1], atol=1e-7)
    assert_equal(results[0][0], fn(torch.cat(srows), torch.cat(trows)))


# ----------------------------------------------------------------------------- info_nce sampling


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_max_tokens_at_least_n_is_unsampled(gen, rand_mask, symmetric):
    s, t = feats(gen, B, T, D), feats(gen, B, T, D)
    mask = rand_mask((B, T), gen)
    n = int(mask.sum())
    full = info_nce(s, t, mask, symmetric=symmetric)
    for max_tokens in (n, n + 1, 10 * n):
        assert_equal(info_nce(s, t, mask, symmetric=symmetric, max_tokens=max_tokens), full)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_max_tokens_below_n_is_the_loss_of_a_subset(symmetric):
    # 7 counted positions, 3 sampled: the loss (and the gradient) must be that of
    # one of the C(7, 3) subsets; the loss does not depend on the order inside one.
    gen = torch.Generator().manual_seed(7)
    s, t = feats(gen, 2, 5, 6), feats(gen, 2, 5, 6)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    srows, trows = s[mask].double(), t[mask].double()
    n, k = srows.shape[0], 3
    subset_values = {
        c: info_nce_rows_ref([srows[i] for i in c], [trows[i] for i in c], 0.1, symmetric).item()
        for c in itertools.combinations(range(n), k)
    }
    assert len(set(round(v, 6) for v in subset_values.values())) == len(subset_values)  # subsets distinguishable
    seen = set()
    for seed in range(6):
        x = s.clone().requires_grad_(True)
        out = info_nce(x, t, mask, symmetric=symmetric, max_tokens=k, generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(out)
        match = [c for c, v in subset_values.items() if v == pytest.approx(out.item(), rel=1e-5, abs=1e-6)]
        assert len(match) == 1, f"max_tokens={k} gave {out.item()}, which is the loss of no subset of size {k}"
        (g,) = torch.autograd.grad(out, x)
        touched = set(torch.nonzero(g[mask].abs().sum(-1) > 0).flatten().tolist())
        assert touched <= set(match[0]), "rows outside the sampled subset got a gradient"
        assert (g[~mask] == 0).all()
        seen.add(match[0])
    assert len(seen) > 1, "different generators always sampled the same subset"


def test_info_nce_generator_makes_sampling_reproducible(gen, rand_mask):
    s, t = feats(gen, B, T, D), feats(gen, B, T, D)
    mask = rand_mask((B, T), gen)
    a = info_nce(s, t, mask, max_tokens=5, generator=torch.Generator().manual_seed(3))
    b = info_nce(s, t, mask, max_tokens=5, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "s_shape,t_shape", [((2, 3, 5), (2, 3, 6)), ((2, 3, 5), (2, 4, 5)), ((6, 5), (2, 3, 5)), ((6, 5), (6, 4))]
)
@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_shape_mismatch_raises(gen, fn, s_shape, t_shape):
    with pytest.raises(ValueError, match=r"\S"):
        fn(feats(gen, *s_shape), feats(gen, *t_shape))


@pytest.mark.parametrize("fn", ALL_FNS, ids=ALL_IDS)
def test_mask_shape_mismatch_raises(gen, fn):
    s = feats(gen, 2, 3, 5)
    with pytest.raises(ValueError, match="mask"):
        fn(s, s, torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_info_nce_non_positive_temperature_raises(gen, temperature):
    s = feats(gen, 4, 5)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(s, s, temperature=temperature)


def test_info_nce_non_positive_max_tokens_raises(gen):
    s = feats(gen, 4, 5)
    with pytest.raises(ValueError, match="max_tokens"):
        info_nce(s, s, max_tokens=0)


# ----------------------------------------------------------------------------- terms: post-norm states, embeddings
#
# The hidden term with ``final_norm`` and the embedding term, called as the engine
# calls them, against references that normalise, project, look up and compare row
# by row in float64.

from conftest import tolerance  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from alignkd import testing as tiny  # noqa: E402
from alignkd.align.maps import Projector  # noqa: E402
from alignkd.errors import ConfigError  # noqa: E402
from alignkd.models.capture import Capture, Needs, Record  # noqa: E402
from alignkd.models.families import blocks_of, final_norm_of  # noqa: E402
from alignkd.terms import TERM_TYPES, StepTensors, Term  # noqa: E402
from alignkd.terms.features import EmbeddingConfig, HiddenConfig, hidden_norms  # noqa: E402

METRIC_REFS = {"mse": hidden_mse_ref, "cosine": hidden_cosine_ref, "standardized": hidden_standardized_mse_ref}
DS, V = 19, 23  # a narrower student width, and a vocabulary for the embedding term


class Side:
    """What the feature terms read of the StudentSide: projectors by (term, block), no adaptive mixtures."""

    def __init__(self, projectors: dict | None = None):
        self.projectors = projectors or {}

    def projector(self, name, block):
        return self.projectors.get((name, block))

    def mix(self, name):
        return None


def step_tensors(student: Record, teacher: Record, mask, ids=None, side=None) -> StepTensors:
    return StepTensors(
        input_ids=ids, mask=mask, labels=None, task=None, student=student, teacher=teacher, vocab=0, side=side or Side()
    )


def rms_norm_ref(v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt(torch.sum(v * v) / v.shape[0] + eps) * w


def rows_metric_ref(metric: str, srows: list[torch.Tensor], trows: list[torch.Tensor]) -> torch.Tensor:
    return METRIC_REFS[metric](torch.stack(srows), torch.stack(trows))


def norm(width: int, gen) -> LlamaRMSNorm:
    n = LlamaRMSNorm(width, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.rand(width, generator=gen) + 0.5)
    return n


def linear(d_in: int, d_out: int, gen) -> Projector:
    """The engine's projector (float32 weights; it casts its input), seeded."""
    proj = Projector(d_in, d_out)
    with torch.no_grad():
        proj.linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in))
    return proj


def grads_close(got: torch.Tensor, ref: torch.Tensor, tol: dict, what: str) -> None:
    assert got is not None, f"{what}: no gradient"
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(
        got.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("narrow", [False, True], ids=["same-width", "projected"])
@pytest.mark.parametrize("metric", list(METRIC_REFS))
def test_hidden_final_norm_parity(gen, rand_mask, metric, narrow, dtype):
    """norm_S(h_S) -> projector -> metric against norm_T(h_T).

    Values, and gradients of the states, the student's norm and the projector.
    """
    ds = DS if narrow else D
    hs = feats(gen, B, T, ds, scale=4.0).to(dtype).requires_grad_(True)
    ht = feats(gen, B, T, D, scale=2.0, offset=0.3).to(dtype)
    mask = rand_mask((B, T), gen)
    s_norm, t_norm = norm(ds, gen), norm(D, gen)
    proj = linear(ds, D, gen) if narrow else None
    term = Term(
        HiddenConfig(name="hidden", metric=metric, final_norm=True), pairs=[(0, 1)], params={"norms": (s_norm, t_norm)}
    )
    x = step_tensors(Record(hidden={0: hs}), Record(hidden={1: ht}), mask, side=Side({("hidden", 0): proj}))
    out = TERM_TYPES["hidden"].compute(term, x, None)
    assert out.dtype == torch.float32 and out.dim() == 0
    out.backward()

    hs64 = hs.detach().double().requires_grad_(True)
    sw64 = s_norm.weight.detach().double().requires_grad_(True)
    pw64 = proj.linear.weight.detach().double().requires_grad_(True) if narrow else None
    tw64 = t_norm.weight.detach().double()
    srows = [rms_norm_ref(v, sw64, 1e-6) for v in counted_rows(hs64, mask)]
    srows = [pw64 @ v for v in srows] if narrow else srows
    trows = [rms_norm_ref(v, tw64, 1e-6) for v in counted_rows(ht.double(), mask)]
    ref = rows_metric_ref(metric, srows, trows)
    ref.backward()

    tol = tolerance(dtype)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    grads_close(hs.grad, hs64.grad, tol, "student states")
    grads_close(s_norm.weight.grad, sw64.grad, tol, "student final norm")
    if narrow:
        grads_close(proj.linear.weight.grad, pw64.grad, tol, "projector")
    assert t_norm.weight.grad is None, "the teacher's norm must get no gradient"


@pytest.mark.parametrize("metric", list(METRIC_REFS))
def test_hidden_final_norm_is_switchable(gen, rand_mask, metric):
    """Off, the term is the plain metric on the block outputs; on, each position's scale is normalised away."""
    hs = feats(gen, B, T, D)
    ht = hs * (torch.rand(B, T, 1, generator=gen) * 20 + 2)  # the same directions, other norms
    mask = rand_mask((B, T), gen)
    shared = norm(D, gen)
    x = step_tensors(Record(hidden={0: hs}), Record(hidden={0: ht}), mask)
    off = Term(HiddenConfig(name="hidden", metric=metric), pairs=[(0, 0)])
    on = Term(
        HiddenConfig(name="hidden", metric=metric, final_norm=True), pairs=[(0, 0)], params={"norms": (shared, shared)}
    )
    assert_equal(TERM_TYPES["hidden"].compute(off, x, None), HIDDEN[list(METRIC_REFS).index(metric)][0](hs, ht, mask))
    assert TERM_TYPES["hidden"].compute(on, x, None).item() < 1e-4
    if metric == "mse":
        assert TERM_TYPES["hidden"].compute(off, x, None).item() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("narrow", [False, True], ids=["same-width", "projected"])
@pytest.mark.parametrize("metric", list(METRIC_REFS))
def test_embedding_term_parity(gen, rand_mask, metric, narrow, dtype):
    """Student embedding rows (through the projector) against the teacher's: values and gradients (table, projector)."""
    ds = DS if narrow else D
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = rand_mask((B, T), gen)
    s_emb, t_emb = nn.Embedding(V, ds).to(dtype), nn.Embedding(V, D).to(dtype)
    with torch.no_grad():
        s_emb.weight.copy_(feats(gen, V, ds))
        t_emb.weight.copy_(feats(gen, V, D, scale=3.0, offset=0.5))
    proj = linear(ds, D, gen) if narrow else None
    term = Term(EmbeddingConfig(name="embedding", metric=metric), params={"embeddings": (s_emb, t_emb)})
    x = step_tensors(Record(), Record(), mask, ids=ids, side=Side({("embedding", None): proj}))
    out = TERM_TYPES["embedding"].compute(term, x, None)
    assert out.dtype == torch.float32 and out.dim() == 0
    out.backward()

    sw64 = s_emb.weight.detach().double().requires_grad_(True)
    pw64 = proj.linear.weight.detach().double().requires_grad_(True) if narrow else None
    kept = [i for i, k in zip(ids.reshape(-1).tolist(), mask.reshape(-1).tolist(), strict=True) if k]
    srows = [pw64 @ sw64[i] if narrow else sw64[i] for i in kept]
    trows = [t_emb.weight.detach().double()[i] for i in kept]
    ref = rows_metric_ref(metric, srows, trows)
    ref.backward()

    tol = tolerance(dtype)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    grads_close(s_emb.weight.grad, sw64.grad, tol, "student embeddings")
    if narrow:
        grads_close(proj.linear.weight.grad, pw64.grad, tol, "projector")
    assert t_emb.weight.grad is None, "the teacher's embeddings must get no gradient"


@pytest.mark.parametrize("metric", list(METRIC_REFS))
def test_feature_terms_all_masked_are_zero(gen, metric):
    """Nothing counted: exactly 0, and finite zero gradients for the states, norm, table and projectors."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    hs = feats(gen, B, T, DS).requires_grad_(True)
    s_norm, proj = norm(DS, gen), linear(DS, D, gen)
    term = Term(
        HiddenConfig(name="hidden", metric=metric, final_norm=True),
        pairs=[(0, 0)],
        params={"norms": (s_norm, norm(D, gen))},
    )
    x = step_tensors(
        Record(hidden={0: hs}), Record(hidden={0: feats(gen, B, T, D)}), mask, side=Side({("hidden", 0): proj})
    )
    out = TERM_TYPES["hidden"].compute(term, x, None)
    s_emb, e_proj = nn.Embedding(V, DS), linear(DS, D, gen)
    term = Term(EmbeddingConfig(name="embedding", metric=metric), params={"embeddings": (s_emb, nn.Embedding(V, D))})
    ids = torch.randint(0, V, (B, T), generator=gen)
    out_emb = TERM_TYPES["embedding"].compute(
        term, step_tensors(Record(), Record(), mask, ids=ids, side=Side({("embedding", None): e_proj})), None
    )
    for value in (out, out_emb):
        assert value.dtype == torch.float32 and value.item() == 0.0
    (out + out_emb).backward()
    for what, p in (
        ("states", hs),
        ("norm", s_norm.weight),
        ("projector", proj.linear.weight),
        ("table", s_emb.weight),
        ("embedding projector", e_proj.linear.weight),
    ):
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad == 0).all(), what


def test_embedding_term_ignores_the_ids_at_padded_positions(gen, rand_mask):
    mask = rand_mask((B, T), gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    other = torch.where(mask, ids, (ids + 7) % V)
    s_emb, t_emb = nn.Embedding(V, D), nn.Embedding(V, D)
    term = Term(EmbeddingConfig(name="embedding", metric="cosine"), params={"embeddings": (s_emb, t_emb)})
    values = []
    for i in (ids, other):
        s_emb.zero_grad()
        out = TERM_TYPES["embedding"].compute(term, step_tensors(Record(), Record(), mask, ids=i), None)
        out.backward()
        values.append((out.detach(), s_emb.weight.grad.clone()))
    assert_equal(values[0][0], values[1][0])
    assert_equal(values[0][1], values[1][1])


# ----------------------------------------------------------------------------- the final norm of each family


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_final_norm_of_the_last_block_output_is_the_models_final_state(family):
    """What ``final_norm`` compares at the last block is exactly the state the model's head reads."""
    model = tiny.build(family, layers=2, width=32).eval()
    capture = Capture(model, Needs(hidden={1}))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = model.base_model(input_ids=ids).last_hidden_state
        normed = final_norm_of(model)(capture.take().hidden[1])
    assert_equal(normed, final, atol=1e-5)
    assert len(blocks_of(model)) == 2


def test_hidden_norms_resolves_or_names_the_fix():
    llama, bert = tiny.build("llama"), tiny.build("bert", task="sequence_classification")
    assert hidden_norms(HiddenConfig(), llama, llama, "losses[1]") == {}
    norms = hidden_norms(HiddenConfig(final_norm=True), llama, llama, "losses[1]")["norms"]
    assert norms[0] is llama.model.norm and norms[1] is llama.model.norm
    with pytest.raises(
        ConfigError, match=r"^losses\[1\]\.final_norm: the teacher \(bert\) has no final norm; set final_norm: false$"
    ):
        hidden_norms(HiddenConfig(final_norm=True), llama, bert, "losses[1]")
    skeleton = tiny.build("llama").to("meta")  # a teacher left unloaded under teacher.cache
    with pytest.raises(ConfigError, match=r"final_norm: the teacher's final norm is not loaded"):
        hidden_norms(HiddenConfig(final_norm=True), llama, skeleton, "losses[1]")
