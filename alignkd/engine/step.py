"""One optimizer step, read top to bottom: micro-batches in, teacher, student, terms, weights, backward, step.

``micro_step`` is one micro-batch; ``optimizer_step`` runs ``train.grad_accum`` of
them, clips, steps and returns what the step did. The schedules' values at a
step (weight multipliers, temperatures) are computed here and passed down; no
term object is mutated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from alignkd.engine import zero
from alignkd.engine.capture import Record
from alignkd.engine.distributed import average_whole, backward, clip_grad_norm, gradient_sync, held_gathered
from alignkd.engine.plan import forward_record
from alignkd.engine.tasks import Batch
from alignkd.engine.weighting import schedule_value
from alignkd.terms import TERM_TYPES, StepTensors


@dataclass
class Schedules:
    """Values of the per-term schedules at one step, in the order of ``run.terms``."""

    multipliers: list[float]
    """Weight multipliers (``weight_schedule``)."""
    temperatures: list[float | None]
    """Temperatures (``temperature_schedule``, else the configured one; None for untempered terms)."""


def schedules_at(run, step: int) -> Schedules:
    total = run.horizon.total
    mult = [schedule_value(t.cfg.weight_schedule, step, total, 1.0) for t in run.terms]
    temps = [
        schedule_value(t.cfg.temperature_schedule, step, total, t.cfg.temperature)
        if TERM_TYPES[t.cfg.type].tempered
        else None
        for t in run.terms
    ]
    return Schedules(mult, temps)


def to_device(batch: Batch, device) -> Batch:
    labels = batch.labels.to(device) if batch.labels is not None else None
    return Batch(batch.input_ids.to(device), batch.mask.to(device), labels, batch.index)


def teacher_forward(run, batch: Batch) -> Record:
    """Frozen teacher under inference mode; returns its logits and captured tensors (from the cache, when the run has one)."""
    if run.cache is not None:
        return run.cache.record(batch.index, run.accelerator.device)
    with torch.inference_mode():
        return forward_record(run.teacher, run.teacher_capture, batch.input_ids, batch.mask, run.unwrapped.fused_head)


def term_losses(
    run, batch: Batch, student: Record, teacher: Record, temperatures: list[float | None]
) -> dict[str, torch.Tensor]:
    """Every term's float32 value on one micro-batch, by term name."""
    x = StepTensors(
        input_ids=batch.input_ids,
        mask=batch.mask,
        labels=batch.labels,
        task=run.task,
        student=student,
        teacher=teacher,
        vocab=run.vocab,
        side=run.unwrapped,
        teacher_model=run.teacher,
        teacher_capture=run.teacher_capture,
        feature_mask=run.task.feature_mask(batch, run.cfg.data.bos == "always"),
        heads=run.heads if run.unwrapped.fused_head else None,
        terms=tuple(zip(run.terms, temperatures, strict=True)),
    )
    return {t.cfg.name: TERM_TYPES[t.cfg.type].compute(t, x, temp) for t, temp in x.terms}


def micro_step(
    run, batch: Batch, token_share: float, at: Schedules, *, update_weights: bool, sync: bool
) -> dict[str, torch.Tensor]:
    """Teacher forward, student forward, term losses, weighted backward of one micro-batch.

    ``token_share`` is this micro-batch's share of the step's counted positions
    (over all micro-batches and processes) times the process count, because DDP
    averages gradients over processes: the step's gradient is then that of the
    mean over every counted position, whatever the accumulation or world size.
    ``sync``: all-reduce gradients in this backward (the last micro-batch only).
    Returns the detached term values and ``loss``, their weighted sum.
    """
    acc = run.accelerator
    teacher = teacher_forward(run, batch) if run.needs_teacher else Record()
    with gradient_sync(run, sync):
        with acc.autocast():
            student = run.side(batch.input_ids, batch.mask)
            zero.ensure_whole(run.side)  # the fused LM-head terms read the head outside its module's forward
            losses = term_losses(run, batch, student, teacher, at.temperatures)
        if update_weights and _all_finite(acc, losses):  # a NaN would poison the learned weights
            shared = [run.unwrapped.student.get_input_embeddings().weight]  # every term's gradient passes through here
            with held_gathered(run):
                run.weighting.update(losses, at.multipliers, shared, reduce=lambda v: acc.reduce(v, "sum"))
        loss = run.weighting.combine(losses, at.multipliers)
        backward(run, loss * token_share, sync)
    return {**{k: v.detach() for k, v in losses.items()}, "loss": loss.detach()}


@dataclass
class StepResult:
    """What one optimizer step did."""

    means: dict[str, float]
    """``loss`` and each term: token-weighted means over micro-batches and processes."""
    grad_norm: float
    lr: float
    """The learning rate the step used."""
    tokens: int
    """Real tokens over all micro-batches and processes."""
    seconds: float
    at: Schedules
    bad: list[str]
    """Why the step was skipped (terms with a non-finite value, or "gradient"); empty when it was applied."""


def optimizer_step(run, step: int, batches: list[Batch]) -> StepResult:
    """Accumulate over ``batches`` (this process's micro-batches), clip, step the optimizer and the schedule."""
    acc, t0 = run.accelerator, time.perf_counter()
    at = schedules_at(run, step)
    counts = [run.task.counted(b) for b in batches]
    global_count = max(acc.reduce(torch.tensor(float(sum(counts)), device=acc.device), "sum").item(), 1.0)
    sums: dict[str, torch.Tensor] = {}  # tensors: no device sync per term
    for k, batch in enumerate(batches):
        token_share = counts[k] * acc.num_processes / global_count
        values = micro_step(
            run,
            batch,
            token_share,
            at,
            update_weights=k == 0 and run.weighting.due(step),
            sync=k == len(batches) - 1,
        )
        for name, v in values.items():
            sums[name] = sums.get(name, 0.0) + v.double() * counts[k]
    # DDP (or FSDP, or ZeRO) averages the side's gradients over processes; the rest is averaged here.
    average_whole(run)
    keys = ["loss", *run.weighting.names]
    totals = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), "sum").tolist()
    tokens = sum(int(b.mask.sum()) for b in batches) * acc.num_processes
    lr = run.scheduler.get_last_lr()[0]
    # Every process sees the same reduced values, so all skip or all step.
    bad = [k for k, v in zip(keys[1:], totals[1:], strict=True) if not math.isfinite(v)]
    max_norm = run.cfg.train.max_grad_norm
    if zero.is_engine(run.side):
        # ZeRO clips over every process's partition and skips a step whose gradient is not
        # finite (a non-finite term makes it so), in one call; the norm is known after it.
        grad_norm, applied = zero.step(run.side)
        bad = bad or ([] if applied else ["gradient"])
    else:
        # With clipping off, an infinite bound still returns the norm for the log.
        grad_norm = clip_grad_norm(run, max_norm if max_norm > 0 else math.inf)
        # Under fp16 an infinite gradient is the loss scaler's business: it skips the step and rescales.
        if not bad and not math.isfinite(grad_norm) and run.cfg.train.mixed_precision != "fp16":
            bad.append("gradient")
        applied = not bad
        if applied:
            run.optimizer.step()
    if applied:
        # Last, so that nothing between the update and the loop's step count can be interrupted.
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    means = {k: float(v) / global_count for k, v in zip(keys, totals, strict=True)}
    return StepResult(means, grad_norm, lr, tokens, time.perf_counter() - t0, at, bad)


def _all_finite(acc, losses: dict[str, torch.Tensor]) -> bool:
    """Whether every term is finite on every process (a collective: all processes must call it)."""
    bad = torch.stack([~torch.isfinite(v.detach()) for v in losses.values()]).any().float()
    return acc.reduce(bad.to(acc.device), "sum").item() == 0
