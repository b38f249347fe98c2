"""Block-wise logit KD: the student's state, projected, runs through the teacher's remaining blocks and head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkd import losses as L
from alignkd.models.capture import Needs
from alignkd.models.families import blocks_of
from alignkd.terms.base import Layered, Projected, StepTensors, Tempered, Term, TermConfig, TermType, mean
from alignkd.terms.features import projected
from alignkd.terms.outputs import DivergenceFields


@dataclass
class BlockwiseConfig(Projected, DivergenceFields, Tempered, Layered, TermConfig):
    """Student state -> projector -> the teacher's blocks after the mapped one and its head; a divergence to the
    teacher's logits."""

    type: str = "blockwise"

    def check(self, where: str) -> None:
        super().check(where)
        self.check_layers(where)
        self.check_temperature(where)
        self.check_divergence(where)
        self.check_projector(where)


def blockwise_needs(cfg, pairs, teacher_blocks: int) -> tuple[Needs, Needs]:
    # The teacher's own states are not read: its remaining blocks run on the student's.
    return Needs(hidden={s for s, _ in pairs}), Needs()


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
    try:
        with x.teacher_capture.paused():
            out = x.teacher_model(input_ids=x.input_ids, attention_mask=x.attended().long())
    finally:
        handle.remove()
    return out.logits


def blockwise_term(term: Term, x: StepTensors, temperature: float | None) -> torch.Tensor:
    c = term.cfg
    _, t_logits, m = x.logits()
    values = []
    for s, t in term.pairs:
        logits = x.task.cut_vocab(_teacher_logits_from(x, t, projected(term, x, s)), x.vocab)
        values.append(L.kl_div(logits, t_logits, m, kind=c.kind, temperature=temperature, beta=c.beta, alpha=c.alpha))
    return mean(values)


BLOCKWISE = TermType(
    BlockwiseConfig,
    blockwise_term,
    "student state -> projector -> teacher's remaining blocks and head, KL to the teacher's logits",
    needs=blockwise_needs,
    projected=True,
    reads_logits=True,
)
