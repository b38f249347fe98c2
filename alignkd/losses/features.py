"""Losses between hidden features of student and teacher.

Inputs are ``[B, T, D]`` with a bool mask ``[B, T]`` or ``[N, D]`` with a mask
``[N]``; student and teacher D must match (a projector upstream maps the student
width to the teacher's). Maths in float32; the result is a float32 scalar, and a
batch with nothing counted gives 0 with a zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkd.losses._reduce import check_mask, check_same_shape, float32_math, mean_over, rows


def _pair(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counted rows of both sides as float32 ``[N, D]``."""
    check_same_shape(student, teacher, name, "features")
    mask = check_mask(student, mask, name)
    return rows(student, mask), rows(teacher, mask)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error averaged over counted positions and over the D features.

    Args: student, teacher ``[B, T, D]`` (or ``[N, D]``); mask ``[B, T]`` (or ``[N]``).
    """
    s, t = _pair(student, teacher, mask, "hidden_mse")
    return mean_over((s - t).pow(2).sum(), s.numel())


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity of each counted position's feature vectors, averaged.

    Args: student, teacher ``[B, T, D]`` (or ``[N, D]``); mask ``[B, T]`` (or ``[N]``).
    """
    s, t = _pair(student, teacher, mask, "hidden_cosine")
    return mean_over((1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum(), s.shape[0])


def _standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # A layer norm with no affine parameters: zero mean, unit variance per row.
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def hidden_standardized_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`hidden_mse` after standardising each position's feature vector on both sides.

    Models whose hidden states have large magnitudes (a few channels in the
    hundreds, as in SmolLM2) then give a loss on the same scale as small ones.

    Args: student, teacher ``[B, T, D]`` (or ``[N, D]``); mask ``[B, T]`` (or ``[N]``).
    """
    s, t = _pair(student, teacher, mask, "hidden_standardized_mse")
    s, t = _standardize(s), _standardize(t)
    return mean_over((s - t).pow(2).sum(), s.numel())


def info_nce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    symmetric: bool = False,
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Contrastive (InfoNCE) alignment of token features.

    The N counted positions of the batch are flattened and L2-normalised on both
    sides; scores = student @ teacher^T / temperature ``[N, N]``. Each student row
    is classified against its own position's teacher feature (the positive) among
    all counted teacher features (the negatives).

    Args:
        student, teacher: ``[B, T, D]`` or ``[N, D]``, equal D.
        mask: bool ``[B, T]`` or ``[N]``.
        temperature: divides the cosine scores.
        symmetric: also classify each teacher row among student features and average.
        max_tokens: when more positions are counted, a random subset of this size is
            used, so the score matrix is at most ``max_tokens x max_tokens``.
        generator: random generator for that subset (the global one when None).

    Returns:
        float32 scalar, mean cross-entropy over the used rows (0 when none is counted).
    """
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"info_nce: max_tokens must be >= 1, got {max_tokens}")
    s, t = _pair(student, teacher, mask, "info_nce")
    n = s.shape[0]
    if max_tokens is not None and n > max_tokens:
        idx = torch.randperm(n, generator=generator, device="cpu")[:max_tokens].to(s.device)
        s, t, n = s[idx], t[idx], max_tokens
    s = F.normalize(s, dim=-1)
    t = F.normalize(t, dim=-1)
    with float32_math(s):
        scores = s @ t.T / temperature
    labels = torch.arange(n, device=s.device)
    total = F.cross_entropy(scores, labels, reduction="sum")
    if symmetric:
        total = 0.5 * (total + F.cross_entropy(scores.T, labels, reduction="sum"))
    return mean_over(total, n)
