"""Which float precision is fast on the machine at hand.

bfloat16 halves memory and, on hardware built for it, multiplies matmul speed:
CUDA GPUs from Ampere on, and CPUs with AVX512-BF16 or AMX. Everywhere else it is
a trap: on an AVX2-only CPU a bf16 matmul is emulated and runs ~20-40x slower
than float32. So no setting hard-codes it; ``auto`` (every dtype setting's
default) resolves here, once per process:

- CUDA: bf16 when ``torch.cuda.is_bf16_supported()``;
- CPU: bf16 when the CPU's flags list a bf16 unit *and* a small bf16 matmul
  really runs at least as fast as float32 (the timing catches a oneDNN limited by
  ``ONEDNN_MAX_CPU_ISA``, and CPUs whose flags we cannot read);
- anything else (MPS, unknown): float32.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)
"""Dtype settings besides ``auto``."""
MIXED_PRECISION = ("no", "bf16", "fp16")
"""``train.mixed_precision`` settings besides ``auto`` (Accelerate's names)."""

# CPU flags (as /proc/cpuinfo spells them) of units that run bf16 matmuls natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 counts as fast when its matmul takes at most this share of float32's time.
# Native units are 1-20x faster; emulation is 20-40x slower, so the margin is wide.
FAST_RATIO = 1.25


@dataclass(frozen=True)
class Bf16Support:
    """Whether bfloat16 is fast on a device, and why (said in a run's first line)."""

    fast: bool
    reason: str


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags on Linux; None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def _matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 5) -> float:
    g = torch.Generator().manual_seed(0)  # leaves the global RNG, and so the run's seeds, alone
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # first call: kernel selection and caches
    best = float("inf")
    for _ in range(reps):  # the minimum: another process sharing the CPU only adds time
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_bf16() -> Bf16Support:
    """Is a bf16 matmul fast on this CPU? Decided once per process (it times a few small matmuls)."""
    flags = _cpu_flags()
    if flags is not None and platform.machine().lower() in ("x86_64", "amd64"):
        native = [f for f in BF16_CPU_FLAGS if f in flags]
        if not native:
            return Bf16Support(False, "no AVX512-BF16 or AMX")
        where = "/".join(native)
    else:
        where = platform.machine() or "CPU"
    ratio = _matmul_seconds(torch.bfloat16) / max(_matmul_seconds(torch.float32), 1e-9)
    if ratio <= FAST_RATIO:
        return Bf16Support(True, f"fast bf16, {where}, bf16 matmul {ratio:.2f}x float32's time")
    return Bf16Support(False, f"slow bf16, {where}, bf16 matmul {ratio:.1f}x float32's time")


def bf16_support(device: torch.device | str) -> Bf16Support:
    """Whether bfloat16 compute is fast on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return Bf16Support(ok, "bf16 supported" if ok else "no bf16 support")
    if kind == "cpu":
        return cpu_bf16()
    return Bf16Support(False, "float32 is the safe choice")


def resolve_dtype(setting: str, device: torch.device | str) -> str:
    """``auto`` -> bfloat16 where it is fast on ``device``, else float32; other settings pass through."""
    if setting != "auto":
        return setting
    return "bfloat16" if bf16_support(device).fast else "float32"


def resolve_mixed_precision(setting: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 autocast where bf16 is fast on ``device``, else no autocast."""
    if setting != "auto":
        return setting
    return "bf16" if bf16_support(device).fast else "no"


def resolve_student_dtype(setting: str) -> str:
    """``auto`` -> float32: the student's weights are AdamW's master weights; bf16 compute comes from autocast."""
    return "float32" if setting == "auto" else setting


def default_device() -> torch.device:
    """Where a run or an evaluation puts its models: CUDA when present (and Accelerate is not told to use the CPU), else
    CPU."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
