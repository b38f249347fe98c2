"""The teacher as a run sees it: one object, live (whole or split over the processes) or read from a teacher cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from alignkd.align.plan import forward_record
from alignkd.align.tasks import Batch
from alignkd.models.capture import Capture, Record
from alignkd.models.families import OutputHead
from alignkd.teacher.cached import TeacherCache


@dataclass
class Teacher:
    """The frozen teacher: what the step reads of it (its record of a batch), its held-out numbers, its head."""

    model: nn.Module
    """The Hugging Face model. Its weights are on the meta device when it never runs: the run reads a
    teacher cache, or trains the teacher's own checkpoint on the ground truth alone."""
    capture: Capture
    """Hooks recording what the terms read of it (block outputs, attention, q/k/v)."""
    cache: TeacherCache | None = None
    """The teacher cache (``teacher.cache``) read instead of running the model."""
    head: OutputHead | None = None
    """Its output head, when the run's output terms read the heads instead of logits (the fused LM head)."""

    @property
    def has_weights(self) -> bool:
        return next(self.model.parameters()).device.type != "meta"

    def place(self, backend, placement: str, say=print) -> None:
        """Put a teacher that runs on this process's device, whole or split over the processes (``teacher.placement``).

        ``backend`` is the run's ``alignkd.backend.Backend``. A fused head is kept whole wherever it is split.
        """
        if self.has_weights:
            keep = self.head.params() if self.head is not None else ()
            self.model = backend.place_teacher(self.model, placement, say, keep_whole=keep)

    def record(self, batch: Batch, device: torch.device, fused: bool) -> Record:
        """The teacher's side of a micro-batch: its logits (or, ``fused``, final hidden states) and captured tensors.

        Carried by the batch (the top-k kept with the teacher's samples), read from the cache when the run has one,
        else computed under ``inference_mode``, on the teacher's own tokens when the tokenizers differ.
        """
        if batch.teacher is not None:
            t = batch.teacher
            return Record(
                topk_ids=t.topk_ids.to(device), topk_logprobs=t.topk_logprobs.to(device), tail=t.tail.to(device)
            )
        if self.cache is not None:
            return self.cache.record(batch.index, device)
        ids, mask = batch.input_ids, batch.mask
        if batch.pair is not None:  # the student has a tokenizer of its own: the teacher reads the text in its own
            ids, mask = batch.pair.teacher_ids, batch.pair.teacher_mask
        with torch.inference_mode():
            return forward_record(self.model, self.capture, ids, mask, fused)

    def heldout(self, evaluate: Callable[[nn.Module], dict], student: nn.Module, eval_blocks: int, say=print) -> dict:
        """The teacher's held-out numbers.

        Measured with ``evaluate``; read from the cache, which measured them when it was
        built on the same data; or, when the teacher never runs because the student
        starts as its checkpoint, the student's before training (the same weights).
        ``eval_blocks``: how many eval blocks ``evaluate`` scores.
        """
        if self.cache is not None:
            meta = self.cache.meta
            if eval_blocks != meta["teacher_eval_blocks"]:
                say(
                    f"teacher held-out numbers from the cache: {meta['teacher_eval_blocks']} eval blocks "
                    f"(the student's: {eval_blocks})"
                )
            return meta["teacher_eval"]
        return evaluate(self.model if self.has_weights else student)

    def close(self) -> None:
        """Remove the capture hooks (a teacher shared by several set-ups, as block search's probes do)."""
        self.capture.remove()
