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

from alignkd.align.plan import StudentSide
from alignkd.align.tasks import Batch, CausalLM
from alignkd.align.weighting import schedule_value
from alignkd.engine.setup import Run
from alignkd.models.capture import Record
from alignkd.teacher import Teacher
from alignkd.terms import TERM_TYPES, StepTensors, Term


@dataclass
class Schedules:
    """Values of the per-term schedules at one step, in the order of ``run.terms``."""

    multipliers: list[float]
    """Weight multipliers (``weight_schedule``)."""
    temperatures: list[float | None]
    """Temperatures (``temperature_schedule``, else the configured one; None for untempered terms)."""


def schedules_at(run: Run, step: int) -> Schedules:
    return term_schedules(run.terms, step, run.horizon.total)


def term_schedules(terms: list[Term], step: int, total: int) -> Schedules:
    """The schedules of ``terms`` at ``step`` of a run of ``total`` optimizer steps."""
    mult = [schedule_value(t.cfg.weight_schedule, step, total, 1.0) for t in terms]
    temps = [
        schedule_value(t.cfg.temperature_schedule, step, total, t.cfg.temperature)
        if TERM_TYPES[t.cfg.type].tempered
        else None
        for t in terms
    ]
    return Schedules(mult, temps)


def to_device(batch: Batch, device) -> Batch:
    labels = batch.labels.to(device) if batch.labels is not None else None
    scored = batch.scored.to(device) if batch.scored is not None else None
    pair = batch.pair.to(device) if batch.pair is not None else None
    return Batch(batch.input_ids.to(device), batch.mask.to(device), labels, batch.index, scored, batch.teacher, pair)


def term_losses(
    run: Run, batch: Batch, student: Record, teacher: Record, temperatures: list[float | None]
) -> dict[str, torch.Tensor]:
    """Every term's float32 value on one micro-batch, by term name."""
    return compute_terms(
        run.terms,
        temperatures,
        batch,
        student,
        teacher,
        side=run.unwrapped,
        task=run.task,
        vocab=run.vocab,
        teacher_side=run.teacher,
        leading_bos=run.cfg.data.bos == "always",
    )


def compute_terms(
    terms: list[Term],
    temperatures: list[float | None],
    batch: Batch,
    student: Record,
    teacher: Record,
    *,
    side: StudentSide,
    task: CausalLM,
    vocab: int,
    teacher_side: Teacher,
    leading_bos: bool,
) -> dict[str, torch.Tensor]:
    """``term_losses`` without a ``Run``: what a step outside the engine (``alignkd.integrations``) calls.

    ``leading_bos``: every row starts with a BOS, which the feature terms leave out.
    """
    x = StepTensors(
        input_ids=batch.input_ids,
        mask=batch.counted_mask,
        real=batch.mask if batch.scored is not None else None,
        labels=batch.labels,
        task=task,
        student=student,
        teacher=teacher,
        vocab=vocab,
        side=side,
        teacher_model=teacher_side.model,
        teacher_capture=teacher_side.capture,
        feature_mask=task.feature_mask(batch, leading_bos),
        heads=(side.head, teacher_side.head) if side.fused else None,
        terms=tuple(zip(terms, temperatures, strict=True)),
        pair=batch.pair,
    )
    return {t.cfg.name: TERM_TYPES[t.cfg.type].compute(t, x, temp) for t, temp in x.terms}


def micro_step(
    run: Run, batch: Batch, token_share: float, at: Schedules, *, update_weights: bool, sync: bool
) -> dict[str, torch.Tensor]:
    """Teacher forward, student forward, term losses, weighted backward of one micro-batch.

    ``token_share`` is this micro-batch's share of the step's counted positions
    (over all micro-batches and processes) times the process count, because DDP
    averages gradients over processes: the step's gradient is then that of the
    mean over every counted position, whatever the accumulation or world size.
    ``sync``: all-reduce gradients in this backward (the last micro-batch only).
    Returns the detached term values and ``loss``, their weighted sum.
    """
    acc, backend = run.accelerator, run.backend
    teacher = run.teacher.record(batch, acc.device, run.unwrapped.fused) if run.needs_teacher else Record()
    with backend.gradient_sync(run.side, sync):
        with acc.autocast():
            student = run.side(batch.input_ids, batch.mask)
            backend.ensure_whole(run.side)  # the fused LM-head terms read the head outside its module's forward
            losses = term_losses(run, batch, student, teacher, at.temperatures)
        if update_weights and _all_finite(acc, losses):  # a NaN would poison the learned weights
            shared = [run.unwrapped.student.get_input_embeddings().weight]  # every term's gradient passes through here
            with backend.held_gathered(run.side):
                run.weighting.update(losses, at.multipliers, shared, reduce=lambda v: acc.reduce(v, "sum"))
        loss = run.weighting.combine(losses, at.multipliers)
        backend.backward(run.side, loss * token_share, sync)
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


def optimizer_step(run: Run, step: int, batches: list[Batch]) -> StepResult:
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
    # The back-end averages the side's gradients over processes; the weighting's are averaged here.
    run.backend.average(run.weighting.model_params())
    keys = ["loss", *run.weighting.names]
    totals = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), "sum").tolist()
    tokens = sum(int(b.mask.sum()) for b in batches) * acc.num_processes
    lr = run.scheduler.get_last_lr()[0]
    # Every process sees the same reduced values, so all skip or all step.
    bad = [k for k, v in zip(keys[1:], totals[1:], strict=True) if not math.isfinite(v)]
    fp16 = run.cfg.train.mixed_precision == "fp16"
    grad_norm, applied = run.backend.clip_and_step(
        run.side, run.optimizer, run.cfg.train.max_grad_norm, bool(bad), fp16
    )
    if not applied and not bad:
        bad = ["gradient"]
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
