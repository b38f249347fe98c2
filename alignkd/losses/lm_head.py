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
``[tokens, V]`` logits ever exist. The loop itself is in ``_head_chunks``.

Precision: the head matmuls (logits, and the gradient pushed into the hidden
states and the head) run in the dtype the model's own head would use: autocast's
when autocast is on for the device (bf16 / fp16), else the hidden states' dtype
when it is bf16 / fp16, else float32. Softmax, the divergence, the cross-entropy
and their gradient w.r.t. the logits are float32 whatever that dtype, and the
gradient buffers accumulate in float32. In bf16 / fp16 the matmuls run on blocks
of a few chunks (``_head_chunks.BLOCK_ELEMENTS``: 64 MB of bf16 logits per model).
"""

from __future__ import annotations

import torch

from alignkd.losses._head_args import build_walk, check_head, check_labels, divergence_fields
from alignkd.losses._head_chunks import HeadLoss, HeadWalk, matmul_dtype
from alignkd.losses._reduce import check_mask


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
    student_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
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
        chunk_tokens: tokens per chunk of the float32 maths; default ``_head_args.CHUNK_ELEMENTS // vocab``
            (16 MB temporaries; 256 MB on CUDA). bf16 / fp16 head matmuls run on blocks of
            several chunks (``_head_chunks.BLOCK_ELEMENTS``).
        student_bias, teacher_bias: optional head biases ``[V_s]`` / ``[V_t]``.
        softcap: logits = softcap * tanh(logits / softcap) on both models, before the
            temperature (Gemma-2/3 ``final_logit_softcapping``).
        vocab: number of leading head rows shared by both models (default min(V_s, V_t));
            rows beyond it (padding of the embedding matrix) are ignored on both sides.
        student_lora: ``(A [r, D_s], B [V_s, r], scale)``, a LoRA adapter on the student's head: its logits
            are ``h_S @ (W_S + scale * B @ A).T``, made per block as ``h W^T + (scale * h A^T) B^T`` (no
            ``[V, D]`` matrix); ``A`` and ``B`` get gradients.

    Returns:
        float32 scalar: mean KL over the counted positions, plus ``ce_weight`` times the
        mean cross-entropy over the counted positions with a label. Nothing counted
        gives 0 with zero gradients. Softmax and divergence maths in float32; the head
        matmuls in the autocast dtype when autocast is on (else the hidden states'
        dtype if bf16 / fp16, else float32), each head cast once per call. Gradients
        w.r.t. ``student_hidden``, ``student_head`` and ``student_bias`` are computed in
        the forward pass.
    """
    walk = _teacher_walk(
        "lm_head_kl",
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        mask,
        labels,
        ce_weight=ce_weight,
        split=False,
        divergence=(kind, temperature, beta, alpha),
        chunk_tokens=chunk_tokens,
        softcap=softcap,
        vocab=vocab,
        lora=student_lora,
    )
    return HeadLoss.apply(student_hidden, student_head, student_bias, walk, *_lora_args(student_lora))[0]


def lm_head_kl_ce(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_tokens: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    vocab: int | None = None,
    student_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KL, CE)`` from one pass over the student's head, each with its own gradient.

    The same two values as ``lm_head_kl(..., mask)`` and ``lm_head_ce`` on the labels of
    the positions in ``mask``, for the price of one walk: the student's logits and their
    log-softmax are made once per chunk. The gradients of the two are kept apart (two
    sets of float32 buffers), so a backward through any weighted sum of them, or
    through one alone (per-term gradients, e.g. GradNorm), is exact.

    Args:
        labels: int, the leading shape of ``mask``: the target token at each position;
            positions outside ``mask`` or with a negative id are not counted by the CE.
        Everything else as in :func:`lm_head_kl`.

    Returns:
        Two float32 scalars: the mean KL over the counted positions and the mean
        cross-entropy over the counted positions with a label (0 with zero gradients
        when there are none).
    """
    if labels is None:
        raise ValueError(
            "lm_head_kl_ce: labels are required (the target token at each position; -100 where there is none)"
        )
    walk = _teacher_walk(
        "lm_head_kl_ce",
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        mask,
        labels,
        ce_weight=1.0,
        split=True,
        divergence=(kind, temperature, beta, alpha),
        chunk_tokens=chunk_tokens,
        softcap=softcap,
        vocab=vocab,
        lora=student_lora,
    )
    kl, ce = HeadLoss.apply(student_hidden, student_head, student_bias, walk, *_lora_args(student_lora))
    return kl, ce


def _lora_args(lora) -> tuple:
    """``HeadLoss.apply``'s trailing (A, B) of an adapter, or (None, None)."""
    return (None, None) if lora is None else (lora[0], lora[1])


def _teacher_walk(
    name: str,
    student_hidden,
    student_head,
    student_bias,
    teacher_hidden,
    teacher_head,
    teacher_bias,
    mask,
    labels,
    *,
    ce_weight: float,
    split: bool,
    divergence: tuple[str, float, float, float],
    chunk_tokens,
    softcap,
    vocab,
    lora=None,
) -> HeadWalk:
    """The walk of :func:`lm_head_kl` / :func:`lm_head_kl_ce` (a live teacher, optional CE), arguments checked."""
    check_head(name, student_hidden, student_head, student_bias, "student ")
    check_head(name, teacher_hidden, teacher_head, teacher_bias, "teacher ")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"{name}: student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} cover different positions; pass both over the same tokens"
        )
    v_s, v_t = student_head.shape[0], teacher_head.shape[0]
    vocab = min(v_s, v_t) if vocab is None else int(vocab)
    if not 1 <= vocab <= min(v_s, v_t):
        raise ValueError(f"{name}: vocab={vocab} must be in [1, {min(v_s, v_t)}] (the heads have {v_s} and {v_t} rows)")
    if ce_weight < 0:
        raise ValueError(f"{name}: ce_weight must be >= 0, got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError(f"{name}: ce_weight={ce_weight} needs labels (the target token at each position)")
    mask = check_mask(student_hidden, mask, name)
    flat_mask = mask.reshape(-1)
    flat_labels, n_ce = None, 0
    if labels is not None and ce_weight > 0:
        flat_labels = check_labels(name, labels, mask, vocab)
        n_ce = int((flat_mask & (flat_labels >= 0)).sum())
    t_dtype = matmul_dtype(teacher_hidden)
    return build_walk(
        name,
        student_hidden,
        student_head,
        student_bias,
        rows=flat_mask.nonzero().squeeze(1),
        vocab=vocab,
        chunk_tokens=chunk_tokens,
        softcap=softcap,
        lora=lora,
        **divergence_fields(name, *divergence),
        teacher_hidden=teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_head=teacher_head.detach()[:vocab].to(t_dtype),
        teacher_bias=None if teacher_bias is None else teacher_bias.detach()[:vocab].to(t_dtype),
        teacher_dtype=t_dtype,
        labels=flat_labels,
        n_ce=n_ce,
        ce_weight=float(ce_weight),
        split=split,
    )


def lm_head_sparse_kl(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_tokens: int | None = None,
    student_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    vocab: int | None = None,
    student_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """:func:`sparse_kl` of ``h_S @ W_S.T`` against a top-k teacher (a teacher cache), chunked like :func:`lm_head_kl`.

    Args:
        student_hidden: final (post-norm) hidden states ``[B, T, D]`` or ``[N, D]``.
        student_head: output-head weight ``[V, D]``; ``student_bias``: ``[V]``.
        teacher_ids, teacher_logprobs, teacher_tail: the teacher's top-k ids and log-probabilities
            ``[B, T, k]`` / ``[N, k]`` and tail log-mass ``[B, T]`` / ``[N]``, as in :func:`sparse_kl`.
        mask, kind, temperature, beta, alpha: as in :func:`sparse_kl`.
        chunk_tokens, softcap, vocab, student_lora: as in :func:`lm_head_kl` (``vocab`` defaults to the head's
            rows).

    Returns:
        float32 scalar, the value of ``sparse_kl`` on the logits, which never exist in full;
        gradients w.r.t. the hidden states, head and bias are made in the forward pass.
    """
    name = "lm_head_sparse_kl"
    check_head(name, student_hidden, student_head, student_bias, "student ")
    vocab = student_head.shape[0] if vocab is None else int(vocab)
    k = teacher_ids.shape[-1]
    lead = tuple(student_hidden.shape[:-1])
    if (
        tuple(teacher_ids.shape) != lead + (k,)
        or teacher_logprobs.shape != teacher_ids.shape
        or tuple(teacher_tail.shape) != lead
    ):
        raise ValueError(
            f"{name}: teacher ids {tuple(teacher_ids.shape)}, log-probabilities {tuple(teacher_logprobs.shape)} "
            f"and tail {tuple(teacher_tail.shape)} must cover the student's positions {lead} "
            "(by k, by k, and one each)"
        )
    if not k <= vocab <= student_head.shape[0]:
        raise ValueError(f"{name}: vocab={vocab} must be in [k={k}, {student_head.shape[0]}] (the head's rows)")
    mask = check_mask(student_hidden, mask, name)
    walk = build_walk(
        name,
        student_hidden,
        student_head,
        student_bias,
        rows=mask.reshape(-1).nonzero().squeeze(1),
        vocab=vocab,
        chunk_tokens=chunk_tokens,
        softcap=softcap,
        **divergence_fields(name, kind, temperature, beta, alpha),
        teacher_topk=(teacher_ids.reshape(-1, k).long(), teacher_logprobs.reshape(-1, k), teacher_tail.reshape(-1)),
        lora=student_lora,
    )
    return HeadLoss.apply(student_hidden, student_head, student_bias, walk, *_lora_args(student_lora))[0]


def lm_head_ce(
    hidden: torch.Tensor,
    head: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    vocab: int | None = None,
    chunk_tokens: int | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``h @ W.T (+ b)`` on ``labels``, chunked like :func:`lm_head_kl` (no ``[tokens, V]`` logits).

    Args:
        hidden: final hidden states ``[B, T, D]`` or ``[N, D]``.
        head: output-head weight ``[V, D]``; ``bias``: ``[V]``.
        labels: int, same leading shape: the target at each position; negative ids are not counted.
        softcap, vocab, chunk_tokens: as in :func:`lm_head_kl`; ``lora``: as its ``student_lora``.

    Returns:
        float32 scalar: the mean over the labelled positions; none gives 0 with zero gradients.
        Precision as in :func:`lm_head_kl`.
    """
    name = "lm_head_ce"
    check_head(name, hidden, head, bias)
    vocab = head.shape[0] if vocab is None else int(vocab)
    if not 1 <= vocab <= head.shape[0]:
        raise ValueError(f"{name}: vocab={vocab} must be in [1, {head.shape[0]}]")
    flat = check_labels(name, labels, torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device), vocab)
    rows = (flat >= 0).nonzero().squeeze(1)
    walk = build_walk(
        name,
        hidden,
        head,
        bias,
        rows=rows,
        vocab=vocab,
        chunk_tokens=chunk_tokens,
        softcap=softcap,
        labels=flat,
        n_ce=rows.numel(),
        ce_weight=1.0,
        lora=lora,
    )
    return HeadLoss.apply(hidden, head, bias, walk, *_lora_args(lora))[0]


# ----------------------------------------------------------------------------- shared by the four
