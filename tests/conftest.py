"""Shared fixtures of the loss tests: seeded generators, random masks, parity checks.

The reference implementations themselves live in each test file, next to the
tests that use them; this file only holds the plumbing that compares a loss
against a reference (values and gradients) with the tolerances of the spec.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# float32 inputs: the losses compute in float32, the references in float64, so
# only float32 rounding separates them.
TIGHT = {"rtol": 1e-4, "atol": 1e-5}
# bfloat16 inputs: the reference sees the same bf16-rounded values (upcast), so
# the gap is float32 maths plus the bf16 rounding of the returned gradient.
LOOSE = {"rtol": 1e-2, "atol": 1e-2}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return TIGHT if dtype == torch.float32 else LOOSE


def assert_close(got: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    torch.testing.assert_close(
        got.detach().double(), ref.detach().double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_grad_close(got: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    """Gradients of a mean over many positions are small (~1/N): scale atol by their size."""
    scale = ref.detach().abs().max().item() or 1.0
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient"
    assert_close(got, ref, rtol=rtol, atol=atol * scale, what=what)


def _cast(x, dtype: torch.dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _upcast(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def run_parity(
    loss: Callable[..., torch.Tensor],
    ref: Callable[..., torch.Tensor],
    student: torch.Tensor,
    *others,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare ``loss(student, *others)`` with ``ref`` on values and student gradients.

    ``student`` and the float tensors in ``others`` are first cast to ``dtype``;
    the reference gets exactly those (rounded) values upcast to float64, and its
    gradient comes from autograd in float64. Returns (loss value, reference value).
    """
    tol = tolerance(dtype)
    x = student.detach().to(dtype).requires_grad_(True)
    args = [_cast(o, dtype) for o in others]
    out = loss(x, *args)
    assert out.dtype == torch.float32, f"result dtype {out.dtype}, the spec says float32"
    assert out.dim() == 0, f"result shape {tuple(out.shape)}, the spec says a scalar"
    out.backward()

    x64 = x.detach().double().requires_grad_(True)
    r = ref(x64, *[_upcast(a) for a in args])
    r.backward()

    assert_close(out, r, **tol, what="value")
    assert x.grad is not None and x.grad.dtype == dtype
    assert_grad_close(x.grad, x64.grad, **tol, what="student gradient")
    return out.detach(), r.detach()


@pytest.fixture
def parity():
    return run_parity


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_mask(shape, gen: torch.Generator, p: float = 0.7) -> torch.Tensor:
    """Random bool mask with at least one counted and one masked position."""
    m = torch.rand(shape, generator=gen) < p
    flat = m.view(-1)
    flat[0] = True
    flat[-1] = False
    return m


@pytest.fixture
def rand_mask():
    return random_mask


def check_all_masked(loss: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor) -> None:
    """Nothing counted: exactly 0, float32, and a gradient of finite zeros."""
    x = student.detach().clone().requires_grad_(True)
    out = loss(x)
    assert out.dtype == torch.float32
    assert torch.isfinite(out), f"all-masked value is {out.item()}"
    assert out.item() == 0.0, f"all-masked value is {out.item()}, expected exactly 0"
    out.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all(), "all-masked gradient has NaN/inf"
    assert (x.grad == 0).all(), "all-masked gradient is not all zeros"


@pytest.fixture
def all_masked():
    return check_all_masked


@pytest.fixture(scope="module")
def one_thread():
    """Width-32 models are far too small for two threads to pay: on a busy 2-core machine
    their spin-waits made steps ~7x slower. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
