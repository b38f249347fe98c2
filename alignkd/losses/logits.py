"""Divergences between the output distributions of student and teacher.

All functions take logits ``[B, T, V]`` with a bool mask ``[B, T]`` or logits
``[N, V]`` with a mask ``[N]`` (True = counted; None counts everything), compute
softmax in float32 whatever the input dtype, and return a float32 scalar: the
mean over counted positions of the per-position divergence summed over the
vocabulary. Nothing counted gives 0 with a zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignkd.losses._chunked import row_sum
from alignkd.losses._reduce import check_mask, check_same_shape, mean_over, safe_log

KL_KINDS = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities ``[N, V]`` -> ``[N]``."""
    return (logp.exp() * (safe_log(logp) - safe_log(logq))).sum(-1)


def _log_mix(w: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log(w * p + (1 - w) * q) from log-probabilities, stable for w in [0, 1]."""
    lw = math.log(w) if w > 0 else -math.inf
    l1w = math.log1p(-w) if w < 1 else -math.inf
    # Clamp first: logaddexp(-inf, -inf) has a NaN gradient (vocabulary entries
    # masked to -inf in both models would otherwise poison the backward pass).
    return torch.logaddexp(safe_log(logp) + lw, safe_log(logq) + l1w)


def kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence of :func:`kl_div`, before the mean: ``[N, V], [N, V] -> [N]``.

    Exposed so that chunked variants (e.g. over the LM head) reuse the same maths.
    Includes the ``temperature**2`` factor.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":
        per = _kl(t, s)
    elif kind == "reverse":
        per = _kl(s, t)
    elif kind == "jsd":
        m = _log_mix(beta, t, s)
        per = beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    elif kind == "skew_forward":
        per = _kl(t, _log_mix(alpha, t, s))
    elif kind == "skew_reverse":
        per = _kl(s, _log_mix(alpha, s, t))
    elif kind == "tvd":
        per = 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    else:  # checked in kl_div; kept for direct callers
        raise ValueError(f"kl_div: unknown kind {kind!r}; choose one of {', '.join(KL_KINDS)}")
    return per * (temperature**2)


def check_kl_args(kind: str, temperature: float, beta: float, alpha: float, name: str = "kl_div") -> None:
    """Raise ``ValueError`` (its message led by ``name``, the function the user called) unless
    ``kind``, ``temperature``, ``beta`` and ``alpha`` are valid for :func:`kl_rows`.

    Shared by every divergence over logits (``kl_div``, ``sparse_kl``, the ``lm_head_*`` losses).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"{name}: unknown kind {kind!r}; choose one of {', '.join(KL_KINDS)}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        # At beta = 0 or 1 the mixture equals one side and this loss is identically 0:
        # use kind="forward" or kind="reverse" instead.
        raise ValueError(f"{name}: jsd needs 0 < beta < 1, got {beta}; use kind='forward' or 'reverse' for the ends")
    if kind.startswith("skew_") and not 0.0 <= alpha < 1.0:
        raise ValueError(f"{name}: {kind} needs 0 <= alpha < 1, got {alpha}")


def kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Divergence between teacher and student token distributions.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``, any float dtype.
        teacher_logits: same shape as ``student_logits``.
        mask: bool ``[B, T]`` or ``[N]``; True marks a counted position.
        kind: with p = softmax(logits / temperature),
            ``forward`` KL(p_T || p_S); ``reverse`` KL(p_S || p_T);
            ``jsd`` beta*KL(p_T || m) + (1-beta)*KL(p_S || m), m = beta*p_T + (1-beta)*p_S;
            ``skew_forward`` KL(p_T || alpha*p_T + (1-alpha)*p_S);
            ``skew_reverse`` KL(p_S || alpha*p_S + (1-alpha)*p_T);
            ``tvd`` 0.5 * sum |p_T - p_S|.
        temperature: softening temperature; the result is multiplied by ``temperature**2``.
        beta: mixture weight of ``jsd``, in (0, 1).
        alpha: skew of ``skew_forward`` / ``skew_reverse``, in [0, 1).

    Returns:
        float32 scalar: mean over counted positions of the divergence summed over V.
    """
    check_kl_args(kind, temperature, beta, alpha)
    check_same_shape(student_logits, teacher_logits, "kl_div", "logits")
    mask = check_mask(student_logits, mask, "kl_div")
    v = student_logits.shape[-1]
    rows = mask.reshape(-1).nonzero().squeeze(1)

    def per_row(s_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        return kl_rows(s_rows, t_rows, kind=kind, temperature=temperature, beta=beta, alpha=alpha)

    closed_form = forward_kl_value_and_grad(temperature) if kind == "forward" else None
    total = row_sum(
        per_row, student_logits.reshape(-1, v), rows, teacher_logits.reshape(-1, v), value_and_grad=closed_form
    )
    return mean_over(total, rows.numel())


def forward_kl_value_and_grad(temperature: float):
    """Forward KL per row and its gradient in closed form: d/dz_S = T * (p_S - p_T).

    Halves the work of autograd for the most common kind (the gradient of
    T^2 * KL(p_T || softmax(z_S / T)) w.r.t. the student logits z_S); the LM-head
    losses push the same gradient through the head.
    """

    def f(s_rows: torch.Tensor, t_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = F.log_softmax(s_rows.float() / temperature, dim=-1)
        t = F.log_softmax(t_rows.float() / temperature, dim=-1)
        p_t = t.exp()
        per = (p_t * (safe_log(t) - safe_log(s))).sum(-1) * temperature**2
        return per, (s.exp() - p_t) * temperature

    return f


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022).

    loss = temperature**2 * (alpha * TCKD + beta * NCKD), where TCKD is the KL between
    the binary (target, rest) distributions of teacher and student and NCKD the KL
    between their distributions over the non-target classes only.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``.
        teacher_logits: same shape.
        target: int ``[B, T]`` or ``[N]``: the class / token id per position (ground
            truth or the teacher's argmax). Negative ids (e.g. -100) are not counted.
        mask: bool ``[B, T]`` or ``[N]``.

    Returns:
        float32 scalar, mean over counted positions. With 2 classes the non-target
        distribution has a single class, so NCKD is 0.
    """
    if not temperature > 0:
        raise ValueError(f"dkd: temperature must be > 0, got {temperature}")
    check_same_shape(student_logits, teacher_logits, "dkd", "logits")
    if student_logits.shape[-1] < 2:
        raise ValueError("dkd: needs at least 2 classes")
    mask = check_mask(student_logits, mask, "dkd")
    if tuple(target.shape) != tuple(mask.shape):
        raise ValueError(
            f"dkd: target has shape {tuple(target.shape)}, expected {tuple(mask.shape)} (one id per position)"
        )
    if target.dtype.is_floating_point:
        raise ValueError("dkd: target must hold integer class ids")
    v = student_logits.shape[-1]
    mask = mask & (target >= 0)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    tgt = target.reshape(-1, 1).long()  # [N_all, 1]; only counted rows are read
    if rows.numel() and int(tgt[rows].max()) >= v:
        raise ValueError(f"dkd: target id {int(tgt[rows].max())} is out of range for {v} classes")

    def split(z: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # log p(target), log p(not target) and log-softmax over the non-target classes,
        # all from logsumexps so nothing is computed as log(1 - p).
        lse = z.logsumexp(-1, keepdim=True)
        log_tgt = z.gather(-1, tgt) - lse
        rest = z.scatter(-1, tgt, -math.inf)
        lse_rest = rest.logsumexp(-1, keepdim=True)
        return log_tgt, lse_rest - lse, rest - lse_rest

    def per_row(s_rows: torch.Tensor, t_rows: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s_tgt, s_not, s_rest = split(s_rows.float() / temperature, tgt)
        t_tgt, t_not, t_rest = split(t_rows.float() / temperature, tgt)
        tckd = _kl(torch.cat([t_tgt, t_not], -1), torch.cat([s_tgt, s_not], -1))
        nckd = _kl(t_rest, s_rest)
        return (alpha * tckd + beta * nckd) * temperature**2

    total = row_sum(per_row, student_logits.reshape(-1, v), rows, teacher_logits.reshape(-1, v), tgt)
    return mean_over(total, rows.numel())
