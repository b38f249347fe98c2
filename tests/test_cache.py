"""The offline teacher cache: the top-k divergence against plain references, and cached runs against live ones.

``sparse_kl`` is checked against a bucketed KL written out here and, with
k = V, against the dense ``kl_div`` (values and gradients). A cache written with
k = V in float32 must train exactly like the live teacher; a cache built for
other data or layers, or a run whose terms need the live teacher, is a one-line
error.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import assert_equal
from test_engine import make_cfg, make_run, read_metrics

import alignkd
from alignkd.config import load_config
from alignkd.engine.cache_teacher import cache_teacher
from alignkd.errors import ConfigError
from alignkd.losses import KL_KINDS, _head_chunks, kl_div, lm_head_sparse_kl, sparse_kl
from alignkd.teacher.cache_format import META, bytes_per_token


def top_k(teacher_logits: torch.Tensor, k: int):
    """The cache's view of teacher logits ``[..., V]``: top-k ids, log-probabilities and log tail mass."""
    logp = torch.log_softmax(teacher_logits.float(), -1)
    top = logp.topk(k, -1)
    rest = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.indices, top.values, rest


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    value = fn(*xs)
    value.backward()
    return value.detach(), [x.grad for x in xs]


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_to_v_is_the_dense_divergence(kind, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 37, generator=g) * 3, torch.randn(3, 7, 37, generator=g) * 3
    mask = torch.rand(3, 7, generator=g) > 0.3
    ids, lp, tail = top_k(t, 37)
    assert torch.isinf(tail).all()
    dense, (g_dense,) = grads(lambda x: kl_div(x, t, mask, kind=kind, temperature=temperature), s)
    sparse, (g_sparse,) = grads(lambda x: sparse_kl(x, ids, lp, tail, mask, kind=kind, temperature=temperature), s)
    assert_equal(sparse, dense)
    assert_equal(g_sparse, g_dense)


def bucket_forward_kl(s: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """Plain reference: KL between the (top-k of the teacher, rest) coarsenings, row by row, in float64."""
    total = []
    for srow, trow in zip(s.double(), t.double(), strict=True):
        p, q = trow.softmax(-1), srow.softmax(-1)
        top = p.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[top], p[rest].sum().reshape(1)])
        qb = torch.cat([q[top], q[rest].sum().reshape(1)])
        total.append((pb * (pb.log() - qb.log())).sum())
    return torch.stack(total).mean()


@pytest.mark.parametrize("k", [1, 5, 36])
def test_top_k_forward_kl_matches_the_bucketed_reference(k):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(11, 37, generator=g) * 2, torch.randn(11, 37, generator=g) * 2
    ids, lp, tail = top_k(t, k)
    got, (g_got,) = grads(lambda x: sparse_kl(x, ids, lp, tail), s)
    want, (g_want,) = grads(lambda x: bucket_forward_kl(x, t, k), s.double())
    assert_equal(got, want.float())
    assert_equal(g_got, g_want.float())


def autograd_buckets(s, ids, lp, tail, mask, kind, temperature):
    """Plain reference in float64: the student's buckets by gather, masked logsumexp and autograd.

    ``kl_rows`` then compares the buckets.
    """
    from alignkd.losses.logits import kl_rows

    z = s.double() / temperature
    lse = z.logsumexp(-1, keepdim=True)
    top = torch.zeros_like(z, dtype=torch.bool).scatter(-1, ids, True)
    sb = torch.cat([z.gather(-1, ids) - lse, z.masked_fill(top, float("-inf")).logsumexp(-1, keepdim=True) - lse], -1)
    tb = torch.log_softmax(torch.cat([lp.double(), tail.double().unsqueeze(-1)], -1) / temperature, -1)
    rows = kl_rows(sb[mask], tb[mask], kind=kind, beta=0.5, alpha=0.1) * temperature**2
    return rows.sum() / max(int(mask.sum()), 1)


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5, 36])
def test_the_closed_form_bucket_gradient_matches_autograd(kind, temperature, k):
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 7, 37, generator=g) * 3, torch.randn(3, 7, 37, generator=g) * 3
    mask = torch.rand(3, 7, generator=g) > 0.3
    ids, lp, tail = top_k(t, k)
    got, (g_got,) = grads(lambda x: sparse_kl(x, ids, lp, tail, mask, kind=kind, temperature=temperature), s)
    want, (g_want,) = grads(lambda x: autograd_buckets(x, ids, lp, tail, mask, kind, temperature), s.double())
    assert_equal(got, want.float())
    assert_equal(g_got, g_want.float())
    # bf16 logits (rounded inputs, so only close): the gradient comes back in bf16, near the float32 one.
    _, (g_half,) = grads(lambda x: sparse_kl(x, ids, lp, tail, mask, kind=kind, temperature=temperature), s.bfloat16())
    assert g_half.dtype == torch.bfloat16
    torch.testing.assert_close(g_half.float(), g_got, atol=5e-2 * g_got.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_top_k_never_exceeds_the_dense_kl(kind):
    """Coarsening loses information: the bucketed KL is a lower bound, and tightens as k grows."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(64, 50, generator=g) * 2, torch.randn(64, 50, generator=g) * 2
    dense = kl_div(s, t, kind=kind)
    values = [sparse_kl(s, *top_k(t, k), kind=kind) for k in (1, 4, 16, 49, 50)]
    assert all(v <= dense + 1e-6 for v in values)
    assert all(a <= b + 1e-6 for a, b in zip(values, values[1:], strict=False))
    assert_equal(values[-1], dense)


def test_edge_cases_all_masked_identical_and_bf16():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 40, generator=g)
    ids, lp, tail = top_k(s, 8)
    # Nothing counted: 0 with a zero gradient, not NaN.
    v, (gs,) = grads(lambda x: sparse_kl(x, ids, lp, tail, torch.zeros(2, 5, dtype=torch.bool)), s)
    assert v.item() == 0 and torch.equal(gs, torch.zeros_like(gs))
    # The student equal to the teacher: 0 for every kind.
    for kind in KL_KINDS:
        assert abs(sparse_kl(s, ids, lp, tail, kind=kind).item()) < 1e-6
    # bf16 student logits: float32 maths inside, close to the float32 value.
    t = torch.randn(2, 5, 40, generator=g)
    ids, lp, tail = top_k(t, 8)
    full = sparse_kl(s, ids, lp, tail)
    half = sparse_kl(s.bfloat16(), ids, lp, tail)
    assert half.dtype == torch.float32 and math.isclose(half.item(), full.item(), rel_tol=2e-2)


def test_bad_shapes_say_what_is_wrong():
    s = torch.randn(4, 10)
    ids, lp, tail = top_k(torch.randn(4, 10), 3)
    with pytest.raises(ValueError, match="positions"):
        sparse_kl(s[:3], ids, lp, tail)


# ---------------------------------------------------------------- the loss from the student's head


def head_case(seed: int, *, lead=(3, 7), d=12, v=37, padded=0, bias=True, k=5):
    """Student hidden states, head (``padded`` extra rows past the vocabulary) and bias; a teacher's top-k; a mask."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g)
    w = torch.randn(v + padded, d, generator=g) / d**0.5 * 3
    b = torch.randn(v + padded, generator=g) if bias else None
    ids, lp, tail = top_k(torch.randn(*lead, v, generator=g) * 3, k)
    mask = torch.rand(*lead, generator=g) > 0.3
    return h, w, b, (ids, lp, tail), mask


def on_logits(h, w, b, top, mask, *, vocab, softcap=None, **kw):
    z = torch.nn.functional.linear(h, w, b)[..., :vocab]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return sparse_kl(z, *top, mask, **kw)


def from_head(h, w, b, top, mask, **kw):
    return lm_head_sparse_kl(h, w, *top, mask, student_bias=b, **kw)


SPARSE_BLOCKING = [(1, None), (4, None), (None, None), (4, 400)]  # 400 // 37: blocks of 10 rows in chunks of 4


@pytest.mark.parametrize("chunk_tokens,block", SPARSE_BLOCKING, ids=[f"chunk{c}-block{b}" for c, b in SPARSE_BLOCKING])
@pytest.mark.parametrize("kind", KL_KINDS)
def test_lm_head_sparse_kl_equals_sparse_kl_on_the_logits(kind, chunk_tokens, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(_head_chunks, "FLOAT32_BLOCK_ELEMENTS", block)
    for k, temperature, softcap, padded in ((5, 1.0, None, 0), (1, 2.0, 4.0, 3), (37, 1.5, None, 3)):
        h, w, b, top, mask = head_case(k, k=k, padded=padded)
        kw = {"kind": kind, "temperature": temperature, "softcap": softcap, "vocab": 37}
        want, g_want = grads(lambda h, w, b, top=top, mask=mask, kw=kw: on_logits(h, w, b, top, mask, **kw), h, w, b)
        got, g_got = grads(
            lambda h, w, b, top=top, mask=mask, kw=kw: from_head(h, w, b, top, mask, chunk_tokens=chunk_tokens, **kw),
            h,
            w,
            b,
        )
        assert_equal(got, want)
        for a, c in zip(g_got, g_want, strict=True):
            assert_equal(a, c)


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_lm_head_sparse_kl_under_bf16_autocast_is_close_to_float32(kind):
    h, w, b, top, mask = head_case(9, lead=(40,), v=37, k=6)
    want, g_want = grads(lambda h, w, b: on_logits(h, w, b, top, mask, vocab=37, kind=kind), h, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, g_got = grads(lambda h, w, b: from_head(h, w, b, top, mask, kind=kind, chunk_tokens=8), h, w, b)
    assert got.dtype == torch.float32 and math.isclose(got.item(), want.item(), rel_tol=2e-2)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.float(), c, atol=3e-2 * c.abs().max().item(), rtol=0)


def test_lm_head_sparse_kl_edge_cases():
    h, w, b, top, mask = head_case(5)
    # Nothing counted: 0 with zero gradients, not NaN.
    v, gs = grads(lambda h, w, b: from_head(h, w, b, top, torch.zeros_like(mask)), h, w, b)
    assert v.item() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in gs)
    # Flat [N, D] inputs and no mask equal the [B, T, D] call with everything counted.
    flat = lm_head_sparse_kl(h.reshape(-1, 12), w, *(t.reshape(21, *t.shape[2:]) for t in top), student_bias=b)
    assert_equal(flat, from_head(h, w, b, top, torch.ones_like(mask)))
    # No gradient wanted: the same value.
    with torch.no_grad():
        assert_equal(from_head(h, w, b, top, mask), on_logits(h, w, b, top, mask, vocab=37))
    with pytest.raises(ValueError, match="positions"):
        lm_head_sparse_kl(h[:2], w, *top)
    with pytest.raises(ValueError, match="vocab"):
        lm_head_sparse_kl(h, w, *top, vocab=3)


# ---------------------------------------------------------------- cache and runs


LOSSES = [
    {"type": "kl"},
    {"type": "ce", "weight": 0.5},
    {"type": "hidden", "layers": [[0, 1]]},
    {"type": "relation", "layers": [[0, 1]]},
]


def cached_cfg(teacher, corpus, out, cache, **teacher_fields):
    cfg = make_cfg(teacher, corpus, out, losses=LOSSES, steps=4, fused_head=False)
    cfg["teacher"].update({"cache": str(cache), **teacher_fields})
    return cfg


def test_a_full_cache_trains_exactly_like_the_live_teacher(teacher, corpus, tmp_path, monkeypatch):
    """k = V and float32 states: the cached run's losses equal the live run's, step by step, read from the
    student's logits or fused through its head."""
    cache = tmp_path / "cache"
    cfg = cached_cfg(teacher, corpus, tmp_path / "cached", cache, cache_top_k=100_000, cache_dtype="float32")
    lines = []
    meta = cache_teacher(load_config(data=copy.deepcopy(cfg)), say=lines.append)
    assert meta["top_k"] == meta["vocab"] == 272
    assert sorted(meta["tensors"]) == ["hidden.1", "ids", "logprobs", "qkv.1.k", "qkv.1.q", "qkv.1.v", "tail"]
    assert "bytes per token" in lines[-1] and "hidden.1 128" in lines[-1]  # 32 float32 values
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the temporary folder was renamed away
    live = copy.deepcopy(cfg)
    del live["teacher"]["cache"]
    live["train"]["output_dir"] = str(tmp_path / "live")
    fused = copy.deepcopy(cfg)
    fused["train"].update(fused_head=True, output_dir=str(tmp_path / "fused"))
    calls = []
    real = alignkd.losses.lm_head_sparse_kl
    monkeypatch.setattr(alignkd.losses, "lm_head_sparse_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    s_live, s_cached = alignkd.distill(load_config(data=live)), alignkd.distill(load_config(data=cfg))
    assert not calls
    alignkd.distill(load_config(data=fused))
    assert len(calls) == 4  # one per step
    rows_live = read_metrics(tmp_path / "live")[0]
    for out in ("cached", "fused"):
        for a, b in zip(rows_live, read_metrics(tmp_path / out)[0], strict=True):
            for key in ("loss/kl", "loss/ce", "loss/hidden", "loss/relation", "loss"):
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (out, a["step"], key, a[key], b[key])
    assert s_cached["teacher_eval"] == pytest.approx(s_live["teacher_eval"], rel=1e-5)


def test_a_cached_run_never_loads_the_teacher_weights(teacher, corpus, tmp_path):
    cache = tmp_path / "cache"
    cfg = cached_cfg(teacher, corpus, tmp_path / "run", cache, cache_top_k=8)
    cfg["student"] = {"config": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32}}
    cfg["losses"] = [{"type": "kl"}, {"type": "hidden", "layers": [[0, 1]]}]
    cache_teacher(load_config(data=copy.deepcopy(cfg)), say=lambda m: None)
    meta = json.loads((cache / META).read_text())
    assert bytes_per_token(meta) == {"logits": 8 * 4 + 8 * 4 + 4, "hidden.1": 32 * 2}  # bfloat16 states
    run = make_run(cfg)
    assert all(p.device.type == "meta" for p in run.teacher.model.parameters())
    from alignkd.engine.loop import next_batches
    from alignkd.engine.step import optimizer_step

    result = optimizer_step(run, 0, next_batches(run, 0))
    assert not result.bad and all(math.isfinite(v) for v in result.means.values())


def test_cache_mismatches_are_one_line_errors(teacher, corpus, tmp_path):
    cache = tmp_path / "cache"
    cfg = cached_cfg(teacher, corpus, tmp_path / "run", cache, cache_top_k=8)
    cfg["losses"] = [{"type": "kl"}]
    with pytest.raises(ConfigError, match="holds no teacher cache"):
        make_run(cfg)
    cache_teacher(load_config(data=copy.deepcopy(cfg)), say=lambda m: None)
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        cache_teacher(load_config(data=copy.deepcopy(cfg)), say=lambda m: None)
    other_data = copy.deepcopy(cfg)
    other_data["data"]["max_train_tokens"] = 400
    with pytest.raises(ConfigError, match="other tokenised data.*cache-teacher"):
        make_run(other_data)
    more_layers = copy.deepcopy(cfg)
    more_layers["losses"].append({"type": "hidden", "layers": [[0, 0]]})
    with pytest.raises(ConfigError, match="lacks hidden.0"):
        make_run(more_layers)
    for kind in ("attention", "dkd", "blockwise"):
        live_only = copy.deepcopy(cfg)
        live_only["losses"] = [{"type": kind}]
        with pytest.raises(ConfigError, match=f"the {kind} term needs the live teacher"):
            load_config(data=live_only)


def test_the_command_line_writes_a_cache_and_prints_its_bytes_per_token(teacher, corpus, tmp_path, capsys):
    import yaml

    from alignkd.cli import main

    cfg = cached_cfg(teacher, corpus, tmp_path / "run", tmp_path / "unused", cache_top_k=16)
    cfg["losses"] = [{"type": "kl"}, {"type": "hidden", "layers": [[0, 0]]}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert (
        main(["cache-teacher", str(path), f"teacher.cache={tmp_path / 'cli_cache'}", "teacher.cache_dtype=float16"])
        == 0
    )
    said = capsys.readouterr()
    lines = said.out.strip().splitlines()
    assert "bytes per token: logits 132, hidden.0 64" in lines[-1]  # 16 x (4 + 4) + 4; 32 float16 values
    # Off a terminal: what is cached first, then progress by tenths of the blocks (never "0 shards"), then the result.
    assert "caching 508 blocks of 16 tokens: top-16 log-probabilities" in lines[0]
    progress = [x for x in said.err.splitlines() if x.startswith("cache-teacher:")]
    assert progress == [f"cache-teacher: {10 * i}% of 508 blocks" for i in range(1, 11)]
    meta = json.loads((tmp_path / "cli_cache" / META).read_text())
    assert meta["tensors"]["hidden.0"]["dtype"] == "float16" and meta["top_k"] == 16
    assert main(["cache-teacher", str(path), f"teacher.cache={tmp_path / 'cli_cache'}", "--overwrite"]) == 0


def test_a_cache_for_a_run_that_chooses_its_blocks_holds_the_chosen_blocks_layers(teacher, corpus, tmp_path):
    """With ``select``, the cache chooses the blocks the run will choose.

    So ``layers: source`` maps to the same teacher blocks.
    """
    cache = tmp_path / "cache"
    cfg = cached_cfg(teacher, corpus, tmp_path / "run", cache, cache_top_k=8)
    cfg["student"] = {"from_teacher": {"num_layers": 1, "select": "importance", "calibration_sequences": 8}}
    cfg["losses"] = [{"type": "kl"}, {"type": "hidden", "layers": "source"}]
    cache_teacher(load_config(data=copy.deepcopy(cfg)), say=lambda m: None)
    meta = json.loads((cache / META).read_text())
    run = make_run(cfg)
    chosen = run.cfg.student.from_teacher.layers
    assert chosen != [0], "even would choose [0]: the test must tell the two apart"
    assert [f"hidden.{b}" for b in chosen] == [k for k in meta["tensors"] if k.startswith("hidden.")]
