"""Shared fixtures and helpers: the loss tests' plumbing, the engine tests' teacher and corpus, one torch thread.

The reference implementations themselves live in each test file, next to the
tests that use them; this file holds the plumbing that compares a loss against
a reference (values and gradients) with the tolerances of the spec and builds
padded batches; the module-scoped ``teacher`` and ``corpus`` that
test_engine.py, test_cache.py and test_finetune.py train on (the tiny models
themselves come from ``alignkd.testing``); the session's one torch thread; and
``run_in_repo``, through which tests reach the benchmarks without importing them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from alignkd import testing as tiny

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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs with one torch thread; restored at the end of the session.

    Width-32 models are far too small for two threads to pay: on a busy 2-core
    machine their spin-waits made steps ~7x slower, and slowed the loss tests
    several times over too. (Once an opt-in per module; a test that set the
    thread count and left it made the rest of the suite single-threaded anyway.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- tensors for the loss tests


def pad_rows(rows_: list[torch.Tensor], length: int, side: str, fill: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length rows ``[L_i, ...]`` into ``[B, length, ...]`` padded on ``side``; returns ``(x, mask)``.

    Padding is filled with ``fill`` (random signs for finite values) so that any
    leak of padded content into the result shows up.
    """
    tail = rows_[0].shape[1:]
    out = torch.empty(len(rows_), length, *tail)
    if math.isfinite(fill):
        out.copy_(fill * torch.sign(torch.randn(out.shape, generator=gen)))
    else:
        out.fill_(fill)
    mask = torch.zeros(len(rows_), length, dtype=torch.bool)
    for b, r in enumerate(rows_):
        n = r.shape[0]
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        out[b, sl] = r
        mask[b, sl] = True
    return out, mask


def assert_equal(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    """Equal up to float32 rounding, compared in float64."""
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=1e-5, atol=atol)


# ----------------------------------------------------------------------------- the engine tests' teacher and corpus
# Module-scoped: each module that asks for them builds its own (test_select.py has its own ``corpus``).


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random 2-block, 32-wide llama teacher with the byte tokenizer (vocab head 272)."""
    return tiny.save_model(tmp_path_factory.mktemp("teacher") / "llama", "llama", layers=2, width=32)


# ----------------------------------------------------------------------------- the benchmarks, from outside
# Tests never import benchmarks/ (test_layout.py checks it): they run a benchmark, or a
# few lines that import it, in a fresh interpreter from the repository root.

REPO = Path(__file__).resolve().parents[1]


def run_in_repo(code: str, *args: str, timeout: float = 300):
    """Run ``python -c code *args`` from the repository root; return the JSON its last stdout line holds."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
