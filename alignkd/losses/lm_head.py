"""Distillation straight from the LM heads: ``kl_div`` of ``h_S W_S^T`` and ``h_T W_T^T`` without the logits.

With a vocabulary of 150k tokens, the float32 logits of 16k tokens take 10 GB per
model, and autograd keeps the student's and their gradient too: more than the rest
of a small student's step. Here the counted tokens are walked in chunks. Each
chunk's teacher logits (no gradient) and student logits are computed from the
final hidden states and the head weights, the divergence is evaluated with the
same per-row maths as :func:`kl_div` (``kl_rows``; the closed form for forward KL),
the cross-entropy on labels is added in the same pass, and the chunk's gradient
w.r.t. its logits is pushed through the head at once into float32 buffers for the
student hidden states, head and bias. The backward pass is a multiplication by
``grad_output``. So the extra memory is a few ``[chunk_tokens, V]`` temporaries
plus the gradient buffers, whatever the number of tokens, and neither model's
``[tokens, V]`` logits ever exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkd.losses._reduce import check_mask, float32_math, mean_over
from alignkd.losses.logits import _check_kl_args, _forward_kl_value_and_grad, kl_rows

NAME = "lm_head_kl"
# Elements of one [chunk_tokens, V] float32 temporary by default. On a CPU the
# chunk's elementwise passes (softmax, exp, the gradient) run at cache speed only
# when a temporary fits the cache: 4M floats (16 MB) made a step with V = 49152
# ~1.5x faster than 16M floats, and faster than full logits. A GPU wants bigger
# matmuls: 64M floats (256 MB).
CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(chunk_tokens: int | None, vocab: int, device: torch.device) -> int:
    if chunk_tokens:
        return int(chunk_tokens)
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, elements // vocab)


@dataclass(frozen=True)
class _Plan:
    """Everything of one call except the three student tensors that get gradients."""

    teacher_hidden: torch.Tensor | None  # [N, D_t], detached; None: cross-entropy only
    teacher_head: torch.Tensor | None  # [vocab, D_t] float32, detached
    teacher_bias: torch.Tensor | None  # [vocab] float32
    rows: torch.Tensor  # 1-D index of the counted rows (KL rows)
    labels: torch.Tensor | None  # [N] long (negative = not counted), None without CE
    n_ce: int  # rows counted by the cross-entropy
    vocab: int
    kind: str
    temperature: float
    beta: float
    alpha: float
    ce_weight: float
    softcap: float | None
    chunk_tokens: int
    needs: tuple[bool, bool, bool]  # gradient wanted for (hidden, head, bias)


def lm_head_kl(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    chunk_tokens: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """``kl_div(h_S @ W_S.T, h_T @ W_T.T, mask, ...) [+ ce_weight * CE]``, chunked over tokens.

    Args:
        student_hidden: final (post-norm) hidden states ``[B, T, D_s]`` or ``[N, D_s]``, any float dtype.
        student_head: output-head weight ``[V_s, D_s]`` (may be the tied input embedding).
        teacher_hidden: ``[B, T, D_t]`` or ``[N, D_t]``, same positions; never gets a gradient.
        teacher_head: ``[V_t, D_t]``; never gets a gradient.
        mask: bool ``[B, T]`` or ``[N]``; True marks a counted position.
        kind, temperature, beta, alpha: as in :func:`kl_div`.
        labels: int ``[B, T]`` or ``[N]``: the target token at each position (the causal
            shift is the caller's); negative ids (e.g. -100) are not counted.
        ce_weight: weight of the student's cross-entropy on ``labels`` (temperature 1).
        chunk_tokens: tokens per chunk; default ``CHUNK_ELEMENTS // vocab`` (16 MB temporaries; 256 MB on CUDA).
        student_bias, teacher_bias: optional head biases ``[V_s]`` / ``[V_t]``.
        softcap: logits = softcap * tanh(logits / softcap) on both models, before the
            temperature (Gemma-2/3 ``final_logit_softcapping``).
        vocab: number of leading head rows shared by both models (default min(V_s, V_t));
            rows beyond it (padding of the embedding matrix) are ignored on both sides.

    Returns:
        float32 scalar: mean KL over the counted positions, plus ``ce_weight`` times the
        mean cross-entropy over the counted positions with a label. Nothing counted
        gives 0 with zero gradients. Maths in float32; a bf16 head is copied to float32
        once per call. Gradients w.r.t. ``student_hidden``, ``student_head`` and
        ``student_bias`` are computed in the forward pass.
    """
    try:
        _check_kl_args(kind, temperature, beta, alpha)
    except ValueError as e:  # same checks as kl_div, under this function's name
        raise ValueError(str(e).replace("kl_div:", f"{NAME}:", 1)) from None
    _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head, student_bias, teacher_bias)
    v_s, v_t = student_head.shape[0], teacher_head.shape[0]
    vocab = min(v_s, v_t) if vocab is None else int(vocab)
    if not 1 <= vocab <= min(v_s, v_t):
        raise ValueError(f"{NAME}: vocab={vocab} must be in [1, {min(v_s, v_t)}] (the heads have {v_s} and {v_t} rows)")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{NAME}: softcap must be > 0 or None, got {softcap}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"{NAME}: chunk_tokens must be >= 1, got {chunk_tokens}")
    if ce_weight < 0:
        raise ValueError(f"{NAME}: ce_weight must be >= 0, got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError(f"{NAME}: ce_weight={ce_weight} needs labels (the target token at each position)")

    mask = check_mask(student_hidden, mask, NAME)
    flat_mask = mask.reshape(-1)
    rows = flat_mask.nonzero().squeeze(1)
    flat_labels, n_ce = None, 0
    if labels is not None and ce_weight > 0:
        flat_labels = _check_labels(labels, mask, vocab)
        n_ce = int((flat_mask & (flat_labels >= 0)).sum())

    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and x is not None and x.requires_grad) for x in (student_hidden, student_head, student_bias))
    d_t = teacher_hidden.shape[-1]
    plan = _Plan(
        teacher_hidden=teacher_hidden.detach().reshape(-1, d_t),
        teacher_head=teacher_head.detach()[:vocab].float(),
        teacher_bias=None if teacher_bias is None else teacher_bias.detach()[:vocab].float(),
        rows=rows,
        labels=flat_labels,
        n_ce=n_ce,
        vocab=vocab,
        kind=kind,
        temperature=float(temperature),
        beta=float(beta),
        alpha=float(alpha),
        ce_weight=float(ce_weight),
        softcap=None if softcap is None else float(softcap),
        chunk_tokens=_chunk_rows(chunk_tokens, vocab, student_hidden.device),
        needs=needs,
    )
    return _LMHeadLoss.apply(student_hidden, student_head, student_bias, plan)


def lm_head_ce(
    hidden: torch.Tensor,
    head: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    vocab: int | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``h @ W.T (+ b)`` on ``labels``, chunked like :func:`lm_head_kl` (no ``[tokens, V]`` logits).

    Args:
        hidden: final hidden states ``[B, T, D]`` or ``[N, D]``.
        head: output-head weight ``[V, D]``; ``bias``: ``[V]``.
        labels: int, same leading shape: the target at each position; negative ids are not counted.
        softcap, vocab, chunk_tokens: as in :func:`lm_head_kl`.

    Returns:
        float32 scalar: the mean over the labelled positions; none gives 0 with zero gradients.
    """
    _check_shapes(hidden, head, hidden, head, bias, bias)
    vocab = head.shape[0] if vocab is None else int(vocab)
    if not 1 <= vocab <= head.shape[0]:
        raise ValueError(f"{NAME}: vocab={vocab} must be in [1, {head.shape[0]}]")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{NAME}: labels have shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:-1])} (one id per position)")
    flat = _check_labels(labels, torch.ones(labels.shape, dtype=torch.bool, device=labels.device), vocab)
    rows = (flat >= 0).nonzero().squeeze(1)
    grad_on = torch.is_grad_enabled()
    plan = _Plan(
        teacher_hidden=None, teacher_head=None, teacher_bias=None, rows=rows, labels=flat, n_ce=rows.numel(),
        vocab=vocab, kind="forward", temperature=1.0, beta=0.5, alpha=0.1, ce_weight=1.0,
        softcap=None if softcap is None else float(softcap),
        chunk_tokens=_chunk_rows(chunk_tokens, vocab, hidden.device),
        needs=tuple(bool(grad_on and x is not None and x.requires_grad) for x in (hidden, head, bias)),
    )
    return _LMHeadLoss.apply(hidden, head, bias, plan)


def _check_shapes(hs, ws, ht, wt, bs, bt) -> None:
    for side, h, w, b in (("student", hs, ws, bs), ("teacher", ht, wt, bt)):
        if h.dim() not in (2, 3):
            raise ValueError(f"{NAME}: {side} hidden states have shape {tuple(h.shape)}; pass [B, T, D] or [N, D]")
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{NAME}: {side} head has shape {tuple(w.shape)}, expected [V, {h.shape[-1]}] "
                "(the output-head weight, one row per token id, as wide as the hidden states)"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{NAME}: {side} bias has shape {tuple(b.shape)}, expected ({w.shape[0]},), one per head row")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"{NAME}: student hidden states {tuple(hs.shape)} and teacher hidden states {tuple(ht.shape)} "
            "cover different positions; pass both over the same tokens"
        )


def _check_labels(labels: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    if tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"{NAME}: labels have shape {tuple(labels.shape)}, expected {tuple(mask.shape)} (one id per position)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{NAME}: labels must hold integer token ids, got {labels.dtype}")
    flat = labels.reshape(-1).to(device=mask.device, dtype=torch.long)
    counted = flat[mask.reshape(-1)]
    if counted.numel() and int(counted.max()) >= vocab:
        raise ValueError(f"{NAME}: label id {int(counted.max())} is out of range for a vocabulary of {vocab}")
    return flat


class _LMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None, plan: _Plan):
        with float32_math(hidden):
            total, grads = _evaluate(hidden, head, bias, plan)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # The usual caller backpropagates the loss itself (grad_out == 1): hand the
        # buffers over as they are instead of allocating scaled copies.
        one = bool(grad_out == 1)
        grads = [g if g is None or one else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None)


def _evaluate(hidden, head, bias, p: _Plan) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loss and its gradients w.r.t. (hidden, head, bias), one chunk of counted rows at a time."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = head.detach()[: p.vocab].float()  # a view when the head is float32
    b = None if bias is None else bias.detach()[: p.vocab].float()
    need_h, need_w, need_b = p.needs
    f32 = {"dtype": torch.float32, "device": h.device}
    grad_h = torch.zeros(h.shape, **f32) if need_h else None
    grad_w = torch.zeros(head.shape, **f32) if need_w else None
    grad_b = torch.zeros(bias.shape, **f32) if need_b else None
    want_grad = need_h or need_w or need_b
    kl_sum = torch.zeros((), **f32)
    ce_sum = torch.zeros((), **f32)
    n_kl = p.rows.numel()

    for i in range(0, n_kl, p.chunk_tokens):
        idx = p.rows[i : i + p.chunk_tokens]
        hs = h.index_select(0, idx).float()
        zs = _logits(hs, w, b, p.softcap)
        if p.teacher_hidden is None:  # cross-entropy only
            g = torch.zeros_like(zs) if want_grad else None
        else:
            zt = _logits(p.teacher_hidden.index_select(0, idx).float(), p.teacher_head, p.teacher_bias, p.softcap)
            kl, g = _kl_and_grad(zs, zt, p, want_grad)
            kl_sum += kl
            g = g.div_(n_kl) if g is not None else None
        if p.labels is not None:
            ce_sum += _add_ce(zs, p.labels.index_select(0, idx), g, p.ce_weight / max(p.n_ce, 1))
        if g is None:
            continue
        if p.softcap is not None:  # chain rule through cap * tanh(z / cap): 1 - tanh^2
            g.mul_(1.0 - (zs / p.softcap).square())
        if need_h:
            grad_h.index_copy_(0, idx, g @ w)
        if need_w:
            grad_w[: p.vocab].addmm_(g.T, hs)
        if need_b:
            grad_b[: p.vocab] += g.sum(0)

    total = mean_over(kl_sum, n_kl) + p.ce_weight * mean_over(ce_sum, p.n_ce)
    grads = [
        None if grad_h is None else grad_h.reshape(hidden.shape).to(hidden.dtype),
        None if grad_w is None else grad_w.to(head.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    ]
    return total, grads


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    z = F.linear(x, w, b)
    if softcap is not None:
        z = torch.tanh(z.div_(softcap)).mul_(softcap)
    return z


def _kl_and_grad(zs: torch.Tensor, zt: torch.Tensor, p: _Plan, want_grad: bool):
    """Summed divergence of the chunk and its gradient w.r.t. the (capped) student logits."""
    kw = {"kind": p.kind, "temperature": p.temperature, "beta": p.beta, "alpha": p.alpha}
    if not want_grad:
        return kl_rows(zs, zt, **kw).sum(), None
    if p.kind == "forward":  # closed form T * (p_S - p_T), as kl_div does
        per, g = _forward_kl_value_and_grad(p.temperature)(zs, zt)
        return per.sum(), g
    leaf = zs.detach().requires_grad_(True)
    with torch.enable_grad():
        value = kl_rows(leaf, zt, **kw).sum()
    (g,) = torch.autograd.grad(value, leaf)
    return value.detach(), g


def _add_ce(zs: torch.Tensor, labels: torch.Tensor, g: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Summed cross-entropy of the chunk's labelled rows; adds ``scale`` times its gradient to ``g``."""
    sel = (labels >= 0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return zs.new_zeros(())
    z = zs.index_select(0, sel)
    tgt = labels.index_select(0, sel).unsqueeze(1)
    logp = z.log_softmax(-1)
    ce = -logp.gather(1, tgt).sum()
    if g is not None:  # d/dz of -log softmax(z)[y] = softmax(z) - onehot(y)
        d = logp.exp_().scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=z.dtype))
        g.index_add_(0, sel, d.mul_(scale))
    return ce
