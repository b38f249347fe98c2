"""Row-chunked evaluation of a per-row loss, with its gradient computed in the forward.

For logits ``[N, V]`` with a large vocabulary, plain autograd keeps several
``[N, V]`` float32 temporaries alive until the backward pass, and selecting the
counted rows (``x[mask]``) costs a copy forward and a scatter backward. Here
the counted rows are gathered one chunk at a time: each chunk's loss and its
gradient w.r.t. the student rows are computed at once, and the gradient is
written straight into a buffer of the input's shape, so the extra memory is one
chunk of temporaries and the backward pass is a multiplication. The maths is
still the one per-row function; only the evaluation order changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Elements per chunk: ~4M floats (16 MB) per temporary whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 22


class _ChunkedRowSum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, student: torch.Tensor, fn: Callable, rows: torch.Tensor, others: tuple, rows_per_chunk: int, analytic: bool
    ):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        every_row = rows.numel() == student.shape[0]
        grad = torch.empty_like(student) if every_row else torch.zeros_like(student)
        for i in range(0, rows.numel(), rows_per_chunk):
            idx = rows[i : i + rows_per_chunk]
            # Advanced indexing, not index_select: on a CPU, index_select of a few rows of a wide
            # [N, V] tensor is tens of times slower than student[idx].
            chunk = student.detach()[idx]
            chunk_others = [o[idx] for o in others]
            if analytic:  # fn returns (per-row values, gradient) itself
                per, g = fn(chunk, *chunk_others)
                value = per.sum()
            else:
                chunk.requires_grad_(True)
                with torch.enable_grad():
                    value = fn(chunk, *chunk_others).sum()
                (g,) = torch.autograd.grad(value, chunk)
            grad.index_copy_(0, idx, g.to(grad.dtype))
            total += value.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def row_sum(
    fn: Callable[..., torch.Tensor],
    student: torch.Tensor,
    rows: torch.Tensor,
    *others: torch.Tensor,
    value_and_grad: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``fn(student[rows], *(o[rows] for o in others)).sum()`` for row-aligned ``[N, ...]`` inputs.

    ``rows`` is a 1-D index of the counted rows; ``fn`` maps row-aligned tensors
    to per-row values ``[n]``. Chunked when only ``student`` needs a gradient,
    plain autograd otherwise. ``value_and_grad``, when given, returns the per-row
    values and their gradient w.r.t. the student rows in closed form (same maths
    as ``fn``, checked against it by the tests) and replaces autograd in the chunks.
    """
    others_grad = any(o.requires_grad for o in others)
    if not (student.requires_grad and torch.is_grad_enabled()) or others_grad or rows.numel() == 0:
        return fn(student[rows], *(o[rows] for o in others)).sum()
    per_row = max(1, student[0].numel())
    chunk_rows = max(1, CHUNK_ELEMENTS // per_row)
    if value_and_grad is not None:
        return _ChunkedRowSum.apply(student, value_and_grad, rows, others, chunk_rows, True)
    return _ChunkedRowSum.apply(student, fn, rows, others, chunk_rows, False)
