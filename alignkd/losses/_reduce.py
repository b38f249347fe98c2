"""Shared plumbing of the losses: mask checks, selection of counted rows, safe logs.

Every loss first selects the counted positions (``x[mask]``) and computes only on
them: padding never enters the maths, so garbage in padded rows (``-inf``, NaN)
cannot leak into the value or the gradient, and a batch with nothing counted
reduces to an empty sum, which is 0 with a gradient of zeros.
"""

from __future__ import annotations

import torch

# Log-probabilities are clamped here before they are multiplied by a probability:
# 0 * (-inf) is NaN, while 0 * (-1e30) is 0. exp(-1e30) is 0 in every float
# format, so the clamp changes no finite value that matters.
LOG_FLOOR = -1e30


def check_mask(x: torch.Tensor, mask: torch.Tensor | None, name: str, feature_dims: int = 1) -> torch.Tensor:
    """Return a bool mask over the leading dims of ``x`` (all True when ``mask`` is None).

    ``x`` has shape ``[*lead, *features]`` with ``feature_dims`` trailing feature dims;
    ``mask`` must have shape ``lead``.
    """
    lead = x.shape[: x.dim() - feature_dims]
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(
            f"{name}: mask has shape {tuple(mask.shape)} but the inputs have positions {tuple(lead)}; "
            "pass a bool mask with one entry per position"
        )
    return mask.to(device=x.device, dtype=torch.bool)


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name: str, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: student {what} {tuple(a.shape)} and teacher {what} {tuple(b.shape)} differ; {_fix(what)}"
        )


def _fix(what: str) -> str:
    if what == "logits":
        return "slice both to the common vocabulary ids first"
    return "map the student width to the teacher width with a projector first"


def rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Counted rows of ``x`` as float32: ``[*lead, *features]`` -> ``[N, *features]``."""
    return x[mask].float()


def float32_math(x: torch.Tensor):
    """Turn off autocast around a loss's matmuls: under bf16 autocast they would run
    in bf16 even on float32 inputs, and the losses promise float32 maths."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def mean_over(total: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """``total / count`` with an empty count giving 0 (``total`` is then an empty sum, 0)."""
    if isinstance(count, torch.Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(int(count), 1)


def safe_log(logp: torch.Tensor) -> torch.Tensor:
    """Clamp log-probabilities so that ``p * (log p - log q)`` is 0 (not NaN) where p is 0."""
    return logp.clamp(min=LOG_FLOOR)
