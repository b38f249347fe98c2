"""Loss terms: each ``type`` of the config is a function here, over captured records.

A term function takes ``(term, x)`` where ``term`` is the resolved ``Term`` (its
config, layer pairs and temperature now) and ``x`` the ``StepTensors`` of one
micro-batch, and returns a float32 scalar. The maths lives in ``alignkd.losses``;
this file only picks tensors out of the records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from alignkd import losses as L
from alignkd.capture import Capture, Record
from alignkd.config import LossConfig
from alignkd.families import blocks_of


@dataclass
class Term:
    """A configured loss term resolved against the two models."""

    cfg: LossConfig
    pairs: list[tuple[int, int]]
    """(student block, teacher block) pairs; empty for output-only terms."""
    relation_heads: int = 0
    temperature: float | None = None
    """Temperature at the current step (after its schedule)."""


@dataclass
class StepTensors:
    """Everything a term may read for one micro-batch."""

    input_ids: torch.Tensor
    """``[B, T]`` token ids."""
    mask: torch.Tensor
    """``[B, T]`` bool: real (non-padding) positions."""
    labels: torch.Tensor | None
    """Classification: ``[B]`` class ids; masked LM: ``[B, T]`` ids with -100 where not predicted; causal LM: None (next token)."""
    task: str
    student: Record
    teacher: Record
    vocab: int
    """Logit columns both models share."""
    side: nn.Module
    """The ``StudentSide``: projectors and adaptive mixtures, keyed by term name."""
    teacher_model: nn.Module | None = None
    teacher_capture: Capture | None = None


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).mean()


def _logits(x: StepTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, teacher logits (both cut to the shared vocabulary) and their position mask."""
    s, t = x.student.logits, x.teacher.logits
    if x.task == "sequence_classification":
        return s, t, torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    s = s[..., : x.vocab]
    t = t[..., : x.vocab] if t is not None else None  # no teacher forward in a CE-only run
    if x.task == "masked_lm":
        return s, t, x.labels != -100
    return s, t, x.mask


def _targets(x: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth ids aligned with the logits, and which positions have one."""
    if x.task == "sequence_classification":
        return x.labels, torch.ones_like(x.labels, dtype=torch.bool)
    if x.task == "masked_lm":
        return x.labels.clamp(min=0), x.labels != -100
    # Causal LM: position i predicts token i + 1; the last position has no target.
    tgt = torch.zeros_like(x.input_ids)
    tgt[:, :-1] = x.input_ids[:, 1:]
    has = x.mask.clone()
    has[:, :-1] &= x.mask[:, 1:]
    has[:, -1] = False
    return tgt, has


def ce_term(term: Term, x: StepTensors) -> torch.Tensor:
    s, _, _ = _logits(x)
    tgt, has = _targets(x)
    # ignore_index instead of s[has]: no [N, V] copy forward and no scatter backward.
    tgt = torch.where(has, tgt, torch.full_like(tgt, -100))
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    return ce / has.sum().clamp(min=1)


def kl_term(term: Term, x: StepTensors) -> torch.Tensor:
    s, t, m = _logits(x)
    c = term.cfg
    return L.kl_div(s, t, m, kind=c.kind, temperature=term.temperature, beta=c.beta, alpha=c.alpha)


def dkd_term(term: Term, x: StepTensors) -> torch.Tensor:
    s, t, m = _logits(x)
    tgt, has = _targets(x)
    c = term.cfg
    return L.dkd(s, t, tgt, m & has, alpha=c.alpha, beta=c.beta, temperature=term.temperature)


def _projected(term: Term, x: StepTensors, s_block: int) -> torch.Tensor:
    h = x.student.hidden[s_block]
    proj = x.side.projector(term.cfg.name, s_block)
    return proj(h) if proj is not None else h


HIDDEN_METRICS: dict[str, Callable] = {
    "mse": L.hidden_mse,
    "cosine": L.hidden_cosine,
    "standardized": L.hidden_standardized_mse,
}


def hidden_term(term: Term, x: StepTensors) -> torch.Tensor:
    metric = HIDDEN_METRICS[term.cfg.metric]
    mix = x.side.mix(term.cfg.name)
    if mix is not None:
        teacher_all = [x.teacher.hidden[j] for j in range(mix.logits.shape[1])]
        return _mean([metric(_projected(term, x, s), mix(i, teacher_all), x.mask) for i, (s, _) in enumerate(term.pairs)])
    return _mean([metric(_projected(term, x, s), x.teacher.hidden[t], x.mask) for s, t in term.pairs])


def attention_term(term: Term, x: StepTensors) -> torch.Tensor:
    return _mean([L.attention_kl(x.student.attention[s], x.teacher.attention[t], x.mask) for s, t in term.pairs])


def relation_term(term: Term, x: StepTensors) -> torch.Tensor:
    return _mean(
        [
            L.relation_kl(
                x.student.qkv[(s, part)],
                x.teacher.qkv[(t, part)],
                x.mask,
                num_relation_heads=term.relation_heads,
                temperature=term.temperature,
            )
            for s, t in term.pairs
            for part in term.cfg.of
        ]
    )


def contrastive_term(term: Term, x: StepTensors) -> torch.Tensor:
    c = term.cfg
    return _mean(
        [
            L.info_nce(_projected(term, x, s), x.teacher.hidden[t], x.mask, temperature=term.temperature, symmetric=c.symmetric, max_tokens=c.max_tokens)
            for s, t in term.pairs
        ]
    )


def _teacher_logits_from(x: StepTensors, t_block: int, h: torch.Tensor) -> torch.Tensor:
    """Teacher logits when the output of teacher block ``t_block`` is replaced by ``h``.

    A forward hook swaps the block's output, so the frozen blocks after it and the
    head run on the student's (projected) state. Gradients flow into ``h`` only:
    the teacher's parameters do not require grad. The blocks before ``t_block``
    still run (their result is discarded); that keeps this independent of each
    family's block signature at the cost of some teacher compute.
    """
    block = blocks_of(x.teacher_model)[t_block]
    h = h.to(next(x.teacher_model.parameters()).dtype)

    def swap(module, args, output):
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(swap)
    paused = x.teacher_capture.paused()
    try:
        with paused:
            out = x.teacher_model(input_ids=x.input_ids, attention_mask=x.mask.long())
    finally:
        handle.remove()
    return out.logits


def blockwise_term(term: Term, x: StepTensors) -> torch.Tensor:
    c = term.cfg
    _, t_logits, m = _logits(x)
    values = []
    for s, t in term.pairs:
        logits = _teacher_logits_from(x, t, _projected(term, x, s))
        if x.task != "sequence_classification":
            logits = logits[..., : x.vocab]
        values.append(L.kl_div(logits, t_logits, m, kind=c.kind, temperature=term.temperature, beta=c.beta, alpha=c.alpha))
    return _mean(values)


TERMS: dict[str, Callable[[Term, StepTensors], torch.Tensor]] = {
    "ce": ce_term,
    "kl": kl_term,
    "dkd": dkd_term,
    "hidden": hidden_term,
    "attention": attention_term,
    "relation": relation_term,
    "contrastive": contrastive_term,
    "blockwise": blockwise_term,
}
