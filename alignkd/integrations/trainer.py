"""``DistillTrainer``: a ``transformers.Trainer`` whose loss is alignkd's weighted loss terms.

The Trainer's model is the student itself, so its optimizer, schedule,
checkpoints and ``save_model`` treat it as any causal LM (saved in Hugging Face
format). What alignkd trains beside it (projectors, adaptive layer mixtures,
uncertainty weights) joins the optimizer as one more parameter group, is
clipped with the student, averaged over processes, and saved next to each
checkpoint in ``alignkd_side.pt``.

One micro-batch is ``alignkd distill``'s: the teacher under ``inference_mode``
(frozen, eval mode), the student with the captures the terms read, the terms,
the weighting (GradNorm and ratio update on a step's first micro-batch). The
returned loss is scaled by the micro-batch's share of the counted positions of
the whole optimizer step (all micro-batches and processes), so that under
gradient accumulation the step's gradient is the token-weighted mean, as in the
engine.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from alignkd.align.plan import forward_record
from alignkd.engine.step import compute_terms, term_schedules
from alignkd.errors import ConfigError
from alignkd.integrations.collator import DistillCollator, counted, to_batch
from alignkd.integrations.meet import checked_config, meet
from alignkd.models.capture import Record

SIDE_FILE = "alignkd_side.pt"
"""Beside the student in each checkpoint and save: the projectors', mixtures' and weighting's state."""


class DistillTrainer(Trainer):
    """``Trainer(model=student, ...)`` plus ``teacher=`` and alignkd's ``losses=`` / ``weighting=`` (or ``config=``).

    ``teacher_tokenizer``: the teacher's tokenizer when it is another object than ``processing_class``; tokenizers
    that differ are refused. Without ``data_collator`` the trainer pads with ``DistillCollator``.
    """

    loss_is_scaled_for_ga = True  # compute_loss scales each micro-batch by its share of the step's positions

    def __init__(
        self,
        model=None,
        args=None,
        *,
        teacher=None,
        losses=None,
        weighting=None,
        config=None,
        teacher_tokenizer=None,
        data_collator=None,
        processing_class=None,
        **kwargs,
    ):
        cfg = checked_config(losses, weighting, config)
        self.meeting = meet(cfg, model, teacher, processing_class, teacher_tokenizer)
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            data_collator = DistillCollator(pad_id=pad if pad is not None else 0)
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        m, device = self.meeting, self.args.device
        if not getattr(m.teacher.model, "hf_device_map", None):  # a teacher placed by device_map stays where it is
            m.teacher.model.to(device)
        for part in (m.side.projectors, m.side.mixes, m.weighting):
            part.to(device)
        self._weights_updated_at = self._grads_cleared_at = -1
        self._term_sums: dict[str, float] = {}
        self._term_count = 0.0

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted sum of the terms on one micro-batch (a mean over its counted positions, scaled to its share
        of the step's when ``num_items_in_batch`` holds the step's count)."""
        m = self.meeting
        batch = to_batch(inputs)
        teacher = m.teacher.record(batch, batch.input_ids.device, False) if m.needs_teacher else Record()
        student = forward_record(model, m.side.capture, batch.input_ids, batch.mask, False)
        step = self.state.global_step
        at = term_schedules(m.terms, step, max(self.state.max_steps, 1))
        bos = m.bos_id is not None and bool((batch.input_ids[:, 0] == m.bos_id).all())
        losses = compute_terms(
            m.terms,
            at.temperatures,
            batch,
            student,
            teacher,
            side=m.side,
            task=m.task,
            vocab=m.vocab,
            teacher_side=m.teacher,
            leading_bos=bos,
        )
        if model.training and self._weights_updated_at != step and m.weighting.due(step):
            self._update_weights(losses, at.multipliers)
            self._weights_updated_at = step
        loss = m.weighting.combine(losses, at.multipliers)
        n = int(batch.counted_mask.sum())
        if model.training:
            self._note(losses, n)
            if num_items_in_batch is not None:
                # DDP averages the gradients over processes, hence the process count.
                loss = loss * (n * self.accelerator.num_processes / num_items_in_batch)
            else:
                loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        return (loss, {"loss": loss, "logits": student.logits}) if return_outputs else loss

    def _update_weights(self, losses: dict[str, torch.Tensor], multipliers: list[float]) -> None:
        acc = self.accelerator
        bad = torch.stack([~torch.isfinite(v.detach()) for v in losses.values()]).any().float()
        if acc.num_processes > 1:
            bad = acc.reduce(bad, "sum")
        if bad.item():  # a NaN would poison the learned weights
            return
        shared = [self.meeting.side.student.get_input_embeddings().weight]
        reduce = (lambda v: acc.reduce(v, "sum")) if acc.num_processes > 1 else None
        self.meeting.weighting.update(losses, multipliers, shared, reduce=reduce)

    def _get_num_items_in_batch(self, batch_samples, device):
        """The counted positions of the step's micro-batches over every process (the engine's normaliser)."""
        if not batch_samples:
            return None
        total = torch.tensor([float(sum(counted(b) for b in batch_samples))], device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total)
        return total.sum().clamp(min=1.0)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation scores the distillation loss (``eval_loss``): the student's logits are not gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ what is trained beside the student

    def create_optimizer(self, model=None):
        given = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        extra = [p for p in self.meeting.extra_parameters() if p.requires_grad and id(p) not in held]
        if extra and given:
            raise ConfigError(
                "optimizers: the optimizer given leaves out what alignkd trains beside the student (projectors, "
                "mixtures, learned weights); add trainer.meeting.extra_parameters() to it or let the Trainer build one"
            )
        side = {id(p) for p in self.meeting.side.parameters()}
        decay = [p for p in extra if p.dim() >= 2 and id(p) in side]  # projector matrices, as the engine decays
        rest = [p for p in extra if not (p.dim() >= 2 and id(p) in side)]
        for params, wd in ((decay, self.args.weight_decay), (rest, 0.0)):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": wd})
        return optimizer

    def _side_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.meeting.side.named_parameters() if not n.startswith("student.")]

    def _clip_grad_norm(self, model):
        """Clip the student and the projectors and mixtures as one, as the engine clips its trainable side."""
        params = [*model.parameters(), *self._side_parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._grads_cleared_at != self.state.global_step:
            # The Trainer zeroes the model's gradients after each step, and these are not in the model.
            for p in self.meeting.extra_parameters():
                p.grad = None
            self._grads_cleared_at = self.state.global_step
        loss = super().training_step(model, inputs, num_items_in_batch)
        acc = self.accelerator
        grads = [p.grad for p in self.meeting.extra_parameters() if p.grad is not None]
        if acc.num_processes > 1 and grads:
            # Not inside the wrapped model, so DDP does not average these; averaging after every micro-batch adds up
            # to the average of the accumulated gradient.
            flat = acc.reduce(torch.cat([g.flatten() for g in grads]), "mean")
            for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(new.view_as(g))
        return loss

    # ------------------------------------------------------------------ saving and logging

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            m = self.meeting
            state = {"side": m.side.aux_state(), "weighting": m.weighting.state_dict()}
            torch.save(state, os.path.join(output_dir or self.args.output_dir, SIDE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, SIDE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.args.device, weights_only=True)
            self.meeting.side.load_state_dict(state["side"], strict=False)
            self.meeting.weighting.load_state_dict(state["weighting"])

    def _note(self, losses: dict[str, torch.Tensor], n: int) -> None:
        for name, v in losses.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(v.detach()) * n
        self._term_count += n

    def log(self, logs, start_time=None):
        """Adds each term's token-weighted mean since the last log (``loss/<name>``) and the weights (``w/<name>``)."""
        if "loss" in logs and self._term_count:
            logs.update({f"loss/{k}": v / self._term_count for k, v in self._term_sums.items()})
            logs.update(self.meeting.weighting.log())
            self._term_sums, self._term_count = {}, 0.0
        super().log(logs, start_time)
