"""How student layers meet teacher layers: layer maps, projectors and adaptive mixtures."""

from __future__ import annotations

import math

import torch
from torch import nn

from alignkd.errors import LayerMapError


def auto_map(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Student block i of L_s meets teacher block round((i + 1) * L_t / L_s) - 1 (at least block 0)."""
    return [(i, max(0, math.floor((i + 1) * num_teacher / num_student + 0.5) - 1)) for i in range(num_student)]


def resolve_map(
    spec, num_student: int, num_teacher: int, where: str, source: list[int] | None = None
) -> list[tuple[int, int]]:
    """Turn ``auto`` / ``last`` / ``source`` / ``adaptive`` / ``[[s, t], ...]`` into (student, teacher) block pairs.

    ``source`` pairs each block of a student copied from the teacher with the
    teacher block it was copied from (``source`` lists them). For ``adaptive`` the
    pairs name the student blocks and the teacher block each mixture starts
    centred on. Negative indices count from the end.
    """
    if spec == "source":
        if source is None:
            raise LayerMapError(
                f"{where}: 'source' needs a student built with student.from_teacher; use auto or explicit pairs"
            )
        return list(enumerate(source))
    if spec in ("auto", "adaptive"):
        return auto_map(num_student, num_teacher)
    if spec == "last":
        return [(num_student - 1, num_teacher - 1)]
    pairs = []
    for s, t in spec:
        for side, idx, n in (("student", s, num_student), ("teacher", t, num_teacher)):
            if not -n <= idx < n:
                raise LayerMapError(
                    f"{where}: {side} layer {idx} does not exist; the {side} has {n} blocks (0..{n - 1})"
                )
        pairs.append((s % num_student, t % num_teacher))
    return pairs


class Projector(nn.Module):
    """Learned map from student width to teacher width: ``[..., D_s] -> [..., D_t]``."""

    def __init__(self, d_student: int, d_teacher: int, norm: bool = False):
        super().__init__()
        self.linear = nn.Linear(d_student, d_teacher, bias=False)
        self.norm = nn.LayerNorm(d_teacher) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x.to(self.linear.weight.dtype)))


class AdaptiveMix(nn.Module):
    """Learned softmax mixture over teacher layers, one per mapped student layer.

    The target of student block i is sum_j softmax(logits_i)_j * teacher_hidden_j
    (layer-wise adaptive distillation). Logits start peaked at the auto map, so
    training begins from the plain mapping and moves away only if it helps.
    """

    def __init__(self, centres: list[int], num_teacher: int, sharpness: float = 2.0):
        super().__init__()
        j = torch.arange(num_teacher, dtype=torch.float32)
        init = torch.stack([-sharpness * (j - c).abs() for c in centres])
        self.logits = nn.Parameter(init)  # [num_mapped, L_t]

    def weights(self) -> torch.Tensor:
        """``[num_mapped, L_t]`` mixture weights, rows summing to 1."""
        return self.logits.softmax(-1)

    def forward(self, row: int, teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
        """Mix ``L_t`` teacher states ``[B, T, D_t]`` into one target ``[B, T, D_t]``."""
        # torch.stack copies, which also turns the teacher's inference-mode tensors
        # into ones autograd may save for the mixture weights' gradient.
        stacked = torch.stack([h.float() for h in teacher_hidden])  # [L_t, B, T, D_t]
        return torch.einsum("l,l...->...", self.weights()[row], stacked)
