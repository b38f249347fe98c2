"""Losses between attention patterns: attention maps and self-relations.

Both are KL(teacher || student) between per-query distributions over keys,
summed over keys and averaged over heads and counted queries, in float32.
"""

from __future__ import annotations

import math

import torch

from alignkd.losses._reduce import check_mask, float32_math, mean_over


def _kl_over_keys(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_k p (log p - log q), with 0 where p is 0: ``[..., K] -> [...]``."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros((), device=p.device)).sum(-1)


def attention_kl(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) between attention probability maps.

    Args:
        student_attn: ``[B, Hs, T, T]``, each query row a distribution over keys.
        teacher_attn: ``[B, Ht, T, T]``. When Hs != Ht both are averaged over heads
            first and compared as one map.
        mask: bool ``[B, T]`` over queries. Masked queries are not counted; masked keys
            carry zero teacher probability and so add nothing.

    Returns:
        float32 scalar: KL summed over keys, averaged over heads and counted queries.
    """
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError("attention_kl: maps must be [B, H, T, T]")
    b, hs, t, k = student_attn.shape
    if (teacher_attn.shape[0], teacher_attn.shape[2], teacher_attn.shape[3]) != (b, t, k):
        raise ValueError(
            f"attention_kl: student maps {tuple(student_attn.shape)} and teacher maps "
            f"{tuple(teacher_attn.shape)} must agree in batch and sequence length"
        )
    s, te = student_attn.float(), teacher_attn.float()
    if hs != te.shape[1]:
        s, te = s.mean(1, keepdim=True), te.mean(1, keepdim=True)
    mask = check_mask(s[:, 0], mask, "attention_kl")  # queries: [B, T]
    s = s.transpose(1, 2)[mask]  # [N, H, K]
    te = te.transpose(1, 2)[mask]
    # The student's log is floored at the smallest normal float: a key the teacher
    # attends to but the student gives exactly 0 costs ~87 nats instead of inf.
    logs = s.clamp(min=torch.finfo(torch.float32).tiny).log()
    logt = te.clamp(min=torch.finfo(torch.float32).tiny).log()
    per = _kl_over_keys(te, logt, logs)  # [N, H]
    return mean_over(per.sum(), per.numel())


def relation_kl(
    student_x: torch.Tensor,
    teacher_x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_relation_heads: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """MiniLMv2 self-relation distillation over queries, keys or values.

    Each side's ``[B, T, D]`` is split into ``num_relation_heads`` heads of width
    d_h = D / heads; relation = softmax(x_h x_h^T / (sqrt(d_h) * temperature)) over
    the counted keys, per head. Student and teacher D may differ; the relation
    maps ``[B, heads, T, T]`` always agree. Works with any attention kernel since it
    needs only the projections, not attention probabilities.

    Args:
        student_x: ``[B, T, Ds]``.
        teacher_x: ``[B, T, Dt]``.
        mask: bool ``[B, T]``: masked positions are neither keys nor counted queries.
        num_relation_heads: heads to split into; must divide Ds and Dt.
        temperature: extra softening of the relation logits.

    Returns:
        float32 scalar: KL(teacher || student) summed over keys, averaged over heads
        and counted queries.
    """
    if student_x.dim() != 3 or teacher_x.dim() != 3:
        raise ValueError("relation_kl: inputs must be [B, T, D]")
    if student_x.shape[:2] != teacher_x.shape[:2]:
        raise ValueError(
            f"relation_kl: student {tuple(student_x.shape)} and teacher {tuple(teacher_x.shape)} "
            "differ in batch or length"
        )
    if not temperature > 0:
        raise ValueError(f"relation_kl: temperature must be > 0, got {temperature}")
    h = num_relation_heads
    for side, x in (("student", student_x), ("teacher", teacher_x)):
        if h < 1 or x.shape[-1] % h:
            raise ValueError(f"relation_kl: num_relation_heads={h} must divide the {side} width {x.shape[-1]}")
    mask = check_mask(student_x, mask, "relation_kl")

    def log_relation(x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # Zero the padding first: inf/NaN there would reach the counted rows through
        # the matmul's backward even though those rows are dropped later.
        x = x.float().masked_fill(~mask[..., None], 0.0)
        xh = x.view(b, t, h, d // h).transpose(1, 2)  # [B, h, T, dh]
        scores = xh @ xh.transpose(-1, -2) / (math.sqrt(d // h) * temperature)
        # Masked keys get the most negative finite score, not -inf, so rows whose
        # keys are all masked stay finite (those queries are dropped below anyway).
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
        return scores.log_softmax(-1)

    with float32_math(student_x):
        logs = log_relation(student_x).transpose(1, 2)[mask]  # [N, h, T]
        logt = log_relation(teacher_x).transpose(1, 2)[mask]
    per = _kl_over_keys(logt.exp(), logt, logs)
    return mean_over(per.sum(), per.numel())
