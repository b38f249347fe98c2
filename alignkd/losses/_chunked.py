"""Row-chunked evaluation of a per-row loss, with its gradient computed in the forward.

For logits ``[N, V]`` with a large vocabulary, plain autograd keeps several
``[N, V]`` float32 temporaries alive until the backward pass. Here the rows are
processed in chunks: each chunk's loss and its gradient w.r.t. the student rows
are computed at once and only the gradient ``[N, V]`` is kept, so the extra
memory is one chunk of temporaries. The backward pass is a multiplication.
The maths is still the one per-row function; only the evaluation order changes.
"""

from __future__ import annotations

from typing import Callable

import torch

# Elements per chunk: ~4M floats (16 MB) per temporary whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 22


class _ChunkedRowSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, fn: Callable, others: tuple, rows_per_chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student)
        for i in range(0, student.shape[0], rows_per_chunk):
            chunk = student[i : i + rows_per_chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                value = fn(chunk, *(o[i : i + rows_per_chunk] for o in others)).sum()
            (g,) = torch.autograd.grad(value, chunk)
            grad[i : i + rows_per_chunk] = g
            total += value.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def row_sum(fn: Callable[..., torch.Tensor], student: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``fn(student, *others).sum()`` over rows ``[N, ...]``, chunked when only ``student`` needs a gradient.

    ``fn`` maps row-aligned tensors to per-row values ``[n]``. Falls back to plain
    autograd when another input needs a gradient (or none does).
    """
    others_grad = any(o.requires_grad for o in others if isinstance(o, torch.Tensor))
    if not (student.requires_grad and torch.is_grad_enabled()) or others_grad or student.shape[0] == 0:
        return fn(student, *others).sum()
    per_row = max(1, student[0].numel())
    return _ChunkedRowSum.apply(student, fn, others, max(1, CHUNK_ELEMENTS // per_row))
