"""Which teacher blocks a shallower student keeps, when nothing measured them: spread evenly."""

from __future__ import annotations

from alignkd.errors import ModelError


def even_layers(num_teacher: int, num_student: int) -> list[int]:
    """``num_student`` teacher block indices spread evenly from the first to the last."""
    if not 1 <= num_student <= num_teacher:
        raise ModelError(f"student.from_teacher.num_layers: must be between 1 and {num_teacher}, got {num_student}")
    if num_student == 1:
        return [0]
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]
