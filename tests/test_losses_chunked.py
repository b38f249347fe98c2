"""The row-chunked evaluation of kl_div / dkd equals plain autograd, chunk boundaries included."""

import pytest
import torch

from alignkd.losses import KL_KINDS, _chunked, dkd, kl_div
from alignkd.losses.logits import kl_rows


@pytest.fixture
def tiny_chunks(monkeypatch):
    # V = 37 columns and 3 rows per chunk: N = 2 * 11 positions split into many chunks
    # with a ragged last one.
    monkeypatch.setattr(_chunked, "CHUNK_ELEMENTS", 37 * 3)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 11, 37, generator=g) * 3).to(dtype)
    t = (torch.randn(2, 11, 37, generator=g) * 3).to(dtype)
    m = torch.rand(2, 11, generator=g) < 0.8
    return s, t, m


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_plain_autograd(tiny_chunks, kind, dtype):
    s, t, m = _data(dtype)
    x = s.clone().requires_grad_(True)
    got = kl_div(x, t, m, kind=kind, temperature=1.7)
    got.backward()
    y = s.clone().requires_grad_(True)
    ref = kl_rows(y[m], t[m], kind=kind, temperature=1.7).sum() / m.sum()
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, ref, **tol)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), y.grad.float(), **tol)


def test_chunked_dkd_equals_unchunked(tiny_chunks, monkeypatch):
    s, t, m = _data()
    tgt = torch.randint(0, 37, (2, 11))
    x = s.clone().requires_grad_(True)
    got = dkd(x, t, tgt, m)
    got.backward()
    monkeypatch.setattr(_chunked, "CHUNK_ELEMENTS", 1 << 30)  # one chunk
    y = s.clone().requires_grad_(True)
    ref = dkd(y, t, tgt, m)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x.grad, y.grad)


def test_gradient_can_be_taken_twice_and_scaled(tiny_chunks):
    # GradNorm takes autograd.grad of each term with retain_graph before the main backward.
    s, t, m = _data()
    x = s.clone().requires_grad_(True)
    loss = kl_div(x, t, m)
    (g1,) = torch.autograd.grad(3.0 * loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, 3.0 * g2)


def test_no_grad_and_teacher_with_grad_take_the_plain_path(tiny_chunks):
    s, t, m = _data()
    with torch.no_grad():
        v = kl_div(s, t, m)
    x, y = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    both = kl_div(x, y, m)
    both.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    torch.testing.assert_close(both.detach(), v)


@pytest.mark.parametrize("name", ["relation_kl", "info_nce", "kl_div", "hidden_cosine"])
def test_losses_keep_float32_maths_under_bf16_autocast(name):
    # The training step runs the losses inside autocast; their matmuls must not drop to bf16.
    from alignkd import losses as L

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    m = torch.ones(2, 9, dtype=torch.bool)
    m[1, 7:] = False
    kwargs = {"num_relation_heads": 4} if name == "relation_kl" else {}
    fn = getattr(L, name)
    plain = fn(s, t, m, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fn(s, t, m, **kwargs)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-5, atol=1e-6)
