"""Divergences against a teacher known only by its top-k log-probabilities and the mass left over.

An offline teacher cache keeps, per position, the teacher's k most likely token
ids, their log-probabilities and the log of the remaining (tail) mass. Both
distributions are then compared on k + 1 buckets: the k cached tokens, and
"everything else". The student's buckets are exact (its top-k entries gathered
from its logits, its tail a logsumexp over the other columns); the teacher's are
exact at temperature 1. Whatever the divergence kind, the bucketed value is the
divergence between the two coarsened distributions.

Bias against the dense divergence: for the KL kinds coarsening can only lose
information, so the bucketed forward or reverse KL is never above the dense one
(data-processing inequality); it misses the part of the divergence that lies in
how the two models spread their tail mass over the tail tokens. With k = V there
is no tail and the value is the dense divergence. At a temperature other than 1
the teacher's tail bucket is tempered as if it were one token (its log-mass over
the temperature), an approximation the dense loss does not make.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkd.losses._chunked import row_sum
from alignkd.losses._reduce import check_mask, mean_over
from alignkd.losses.logits import check_kl_args, kl_rows


class _StudentBuckets(torch.autograd.Function):
    """Student bucket log-probabilities ``[N, V], [N, k] -> [N, k(+1)]``, with the gradient in closed form.

    For the top-k columns the bucket is ``z_i - lse``; the tail is
    ``log(sum of p_j outside the top k)``. With ``G`` the sum of the incoming
    gradients ``g`` and ``p = softmax(z)``, the gradient is
    ``p_j * (g_tail / p_tail - G)`` outside the top k and ``g_i - p_i * G`` on
    it: one pass over ``[N, V]`` in backward, where autograd through the
    gathers, the scatter and the two logsumexps would take several.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        z = logits.float()
        if temperature != 1.0:
            z = z / temperature
        lse = z.logsumexp(-1, keepdim=True)
        s = z.gather(-1, ids) - lse
        tail = ids.shape[-1] < z.shape[-1]
        if tail:
            rest = z.scatter(-1, ids, float("-inf"))
            s = torch.cat([s, rest.logsumexp(-1, keepdim=True) - lse], -1)
            del rest
        ctx.save_for_backward(z, lse, ids, s)
        ctx.temperature, ctx.tail, ctx.dtype = temperature, tail, logits.dtype
        return s

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, lse, ids, s = ctx.saved_tensors
        k = ids.shape[-1]
        total = g.sum(-1, keepdim=True)
        p = (z - lse).exp_()
        p_top = p.gather(-1, ids)
        if ctx.tail:
            p_tail = s[:, k:].exp()
            # A tail of zero mass has log -inf: no finite gradient flows through it.
            per_tail = torch.where(p_tail > 0, g[:, k:] / p_tail, torch.zeros_like(p_tail))
            dz = p.mul_(per_tail - total)
        else:
            dz = p.mul_(-total)
        dz.scatter_(-1, ids, g[:, :k] - p_top * total)
        if ctx.temperature != 1.0:
            dz.div_(ctx.temperature)
        return dz.to(ctx.dtype), None, None


def topk_buckets(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucketed log-probabilities ``(student, teacher)``: ``[N, V], [N, k], [N, k], [N] -> [N, k(+1)], [N, k(+1)]``.

    The last bucket is the tail; it is left out when ``k == V`` (nothing is left over).
    """
    ids = teacher_ids.long()
    s = _StudentBuckets.apply(student_logits, ids, float(temperature))
    t = teacher_logprobs.float() / temperature
    if ids.shape[-1] < student_logits.shape[-1]:
        t = torch.cat([t, teacher_tail.float().unsqueeze(-1) / temperature], -1)
    # At temperature 1 the teacher's buckets already sum to 1; otherwise this renormalises them.
    return s, F.log_softmax(t, dim=-1)


def sparse_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """:func:`kl_div` against a top-k teacher.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``, any float dtype.
        teacher_ids: int ``[B, T, k]`` or ``[N, k]``: the teacher's top-k token ids (distinct, < V).
        teacher_logprobs: ``[..., k]``: their log-probabilities at temperature 1.
        teacher_tail: ``[B, T]`` or ``[N]``: log of the teacher's remaining mass (``-inf`` when none).
        mask: bool ``[B, T]`` or ``[N]``; True marks a counted position.
        kind, temperature, beta, alpha: as in :func:`kl_div` (the result is multiplied by ``temperature**2``).

    Returns:
        float32 scalar: mean over counted positions of the bucketed divergence.
    """
    check_kl_args(kind, temperature, beta, alpha, "sparse_kl")
    v, k = student_logits.shape[-1], teacher_ids.shape[-1]
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse_kl: teacher ids {tuple(teacher_ids.shape)} and log-probabilities {tuple(teacher_logprobs.shape)} "
            f"must both be the student's positions {tuple(student_logits.shape[:-1])} by k"
        )
    if k > v:
        raise ValueError(f"sparse_kl: k = {k} teacher entries per position for a vocabulary of {v}")
    mask = check_mask(student_logits, mask, "sparse_kl")
    rows = mask.reshape(-1).nonzero().squeeze(1)

    def per_row(s_rows, ids, lp, tail):
        s, t = topk_buckets(s_rows, ids, lp, tail, temperature)
        return kl_rows(s, t, kind=kind, beta=beta, alpha=alpha) * temperature**2

    total = row_sum(
        per_row,
        student_logits.reshape(-1, v),
        rows,
        teacher_ids.reshape(-1, k),
        teacher_logprobs.reshape(-1, k),
        teacher_tail.reshape(-1),
    )
    return mean_over(total, rows.numel())
