"""Everything a run needs, built once: models, plan, teacher, back-end, weighting, optimizer, data (``setup`` ->
``Run``).

The loop (``engine.loop``) and the step (``engine.step``) read the ``Run``. The
student's blocks are chosen before (``engine.block_choice``), so that a block
search can call ``setup`` for its probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from alignkd.align.plan import StudentSide, TermPlan, build_plan, unwrap
from alignkd.align.tasks import TASKS, CausalLM, PairedLM, heldout
from alignkd.align.weighting import Weighting, build_weighting
from alignkd.backend import Backend, make_backend
from alignkd.config import Config, resolve_precision
from alignkd.data import BlockSampler
from alignkd.engine.augment import with_teacher_rows
from alignkd.engine.horizon import Horizon
from alignkd.engine.judge import judge
from alignkd.engine.load import Inputs, fused_heads, load_models, other_tokenizer
from alignkd.engine.sources import Sources, any_running
from alignkd.errors import ConfigError
from alignkd.models.capture import Capture
from alignkd.models.families import disable_attention_dropout
from alignkd.teacher import Teacher, TeacherCache
from alignkd.terms import TERM_TYPES, Term, check_pairing


@dataclass(kw_only=True)
class Run:
    """What the loop, the step, checkpoints and the export read of a run."""

    cfg: Config
    """The resolved config (what ``config.yaml`` records)."""
    accelerator: Accelerator
    backend: Backend
    """The parallel back-end (one process, DDP, FSDP2 or ZeRO): it wraps, steps and saves the side."""
    tokenizer: object
    """The teacher's tokenizer."""
    student_tokenizer: object
    """The student's: the teacher's, unless the student has one of its own (``task`` is then a ``PairedLM``)."""
    teacher: Teacher
    side: nn.Module
    """The ``StudentSide`` (student, projectors, mixtures) as the back-end wrapped it; ``unwrapped`` is the side."""
    terms: list[Term]
    weighting: Weighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    """Stepped once per applied optimizer step."""
    train_data: dict[str, torch.Tensor]
    eval_data: dict[str, torch.Tensor]
    sampler: BlockSampler
    sources: Sources
    """Where each micro-batch comes from: the data, or the student's or teacher's samples (``generation``)."""
    vocab: int
    """Logit columns the two models share (0 for classification)."""
    task: CausalLM
    """The task object of ``alignkd.align.tasks`` (causal LM, masked LM or classification)."""
    out: Path
    """``train.output_dir``."""
    horizon: Horizon
    """When training ends (``train.steps`` or ``train.max_minutes``); the schedules read its ``total``."""

    @property
    def needs_teacher(self) -> bool:
        """False for a run of ground-truth terms only (a baseline): then the teacher never runs."""
        return any(TERM_TYPES[t.cfg.type].uses_teacher for t in self.terms)

    @property
    def unwrapped(self) -> StudentSide:
        return unwrap(self.side)

    def evaluate(self, model: nn.Module) -> dict:
        """Held-out loss (and perplexity, or accuracy) of ``model`` on the eval data. When the student has a tokenizer
        of its own, the teacher reads the blocks in its own tokens, and bits per byte compare the two."""
        t = self.cfg.train
        data = self.eval_data
        if isinstance(self.task, PairedLM):
            data = self.task.teacher_view(data) if model is self.teacher.model else self.task.student_view(data)
        return heldout(
            self.task,
            model,
            data,
            self.tokenizer,
            batch_size=t.batch_size,
            batches=t.eval_batches,
            device=self.accelerator.device,
            autocast=self.accelerator.autocast,
        )

    def judge(self) -> dict:
        """The generation metrics (``engine.judge``) on ``generation.eval_prompts`` held-out prompts."""
        g, acc = self.cfg.generation, self.accelerator
        blocks = self.eval_data["input_ids"]
        n = min(g.eval_prompts, blocks.shape[0])
        prompts = [torch.as_tensor(blocks[i])[: g.prompt_tokens].long().to(acc.device) for i in range(n)]
        with self.unwrapped.capture.paused(), self.teacher.capture.paused():
            return judge(
                self.unwrapped.student,
                self.teacher.model,
                prompts,
                self.sources.sampling,
                seed=self.cfg.train.seed,
                eos_ids=self.sources.eos_ids,
                pad_id=self.sources.pad_id,
                vocab=self.vocab,
                autocast=acc.autocast,
                batch=self.cfg.train.batch_size,
                any_running=any_running(acc),
            )


def lr_lambda(warmup: int, horizon: Horizon, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` at the horizon's projected last step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min((step - warmup) / max(horizon.total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _optimizer(cfg: Config, side: nn.Module, weighting: Weighting, backend: Backend) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trained parameters; no weight decay on norms, biases and the weighting's own
    parameters."""
    choice = cfg.train.optimizer
    if choice not in backend.optimizers:
        raise ConfigError(
            f"train.optimizer: {choice} is not available under this launch; use {' or '.join(backend.optimizers)}"
        )
    decay, no_decay = [], []
    for name, p in side.named_parameters():
        if not p.requires_grad:  # student.freeze: no gradient, no optimizer state
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": part, "weight_decay": wd}
        for params, wd in ((decay, cfg.train.weight_decay), (no_decay + weighting.model_params(), 0.0))
        for part in backend.param_groups(params)
    ]
    if choice == "adafactor":
        # Factored second moments: a [V, D] matrix keeps V + D state values, where AdamW keeps 2 V D.
        return torch.optim.Adafactor(groups, lr=cfg.train.lr)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95))


def meet_models(
    cfg: Config, task, student: nn.Module, teacher_model: nn.Module, say
) -> tuple[TermPlan, StudentSide, Teacher]:
    """The terms resolved against the two models, the trainable side and the teacher that the terms read."""
    plan = build_plan(cfg.losses, student, teacher_model)
    if plan.needs_eager_attention:
        say("[yellow]attention loss: switching both models to eager attention (slower, O(T^2) memory per layer)[/]")
        for m in (teacher_model, student):
            m.set_attn_implementation("eager")
        disable_attention_dropout(student)
    side = StudentSide(student, plan.student_needs, plan.projectors, plan.mixes)
    heads = fused_heads(cfg, task, student, teacher_model)
    side.head = heads[0] if heads else None
    teacher = Teacher(
        teacher_model,
        Capture(teacher_model, plan.teacher_needs),
        cache=TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None,
        head=heads[1] if heads else None,
    )
    return plan, side, teacher


def term_weighting(cfg: Config, terms: list[Term]) -> Weighting:
    """``cfg.weighting`` over the plan's terms (their names, weights and types)."""
    w = cfg.weighting
    return build_weighting(
        w.strategy,
        [t.cfg.name for t in terms],
        [t.cfg.weight for t in terms],
        alpha=w.alpha,
        lr=w.lr,
        every=w.every,
        kinds=[t.cfg.type for t in terms],
    )


def _models(cfg: Config, inputs: Inputs | None, say):
    """The task, the teacher's and (when it has its own) the student's tokenizer, both models and the logit columns
    they share. A student with a tokenizer of its own makes the task a ``PairedLM``."""
    task = TASKS[cfg.teacher.task]
    student_tok = other_tokenizer(cfg, inputs.tokenizer if inputs else _teacher_tokenizer(cfg), say=say)
    tok, teacher_model, student, vocab = load_models(cfg, inputs=inputs, student_tok=student_tok)
    if student_tok is not None:
        task = _paired(cfg, tok, student_tok, teacher_model, say)
    check_pairing([t.type for t in cfg.losses], paired=student_tok is not None)
    return task, tok, student_tok, teacher_model, student, vocab


def _schedule(cfg: Config, optimizer) -> tuple[Horizon, torch.optim.lr_scheduler.LambdaLR]:
    """When training ends, and the learning-rate schedule to that end."""
    max_seconds = cfg.train.max_minutes * 60 if cfg.train.max_minutes is not None else None
    horizon = Horizon(cfg.train.steps, max_seconds)
    # Stepped by hand once per optimizer step (Accelerate's wrapper would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup, horizon, cfg.train.min_lr_ratio)
    )
    return horizon, scheduler


def _teacher_tokenizer(cfg: Config):
    from alignkd.models import load_tokenizer

    t = cfg.teacher
    return load_tokenizer(t.path, what="teacher", trust_remote_code=t.trust_remote_code)


def _paired(cfg: Config, tok, student_tok, teacher_model: nn.Module, say) -> PairedLM:
    """The task of a run whose student has a tokenizer of its own, after refusing what cannot pair."""
    from alignkd.data.pairs import matched_tokens
    from alignkd.models.loading import max_positions

    g = cfg.generation
    refused = (
        ("teacher.cache", cfg.teacher.cache, "a teacher cache holds the teacher's outputs on the student's blocks"),
        ("generation.sources", any(k != "dataset" for k in g.sources), "sampled text is one tokenizer's ids"),
        ("generation.eval_prompts", g.eval_prompts, "the generation metrics compare token ids"),
        ("data.augment / data.unlabelled", cfg.data.augment or cfg.data.unlabelled, "these are for classification"),
    )
    for key, bad, why in refused:
        if bad:
            raise ConfigError(
                f"{key}: not supported when the student's tokenizer differs from the teacher's ({why}); leave it out"
            )
    matched = matched_tokens(student_tok, tok)
    say(
        f"tokenizers differ (teacher {len(tok)} tokens, student {len(student_tok)}; {len(matched[0])} spell the same "
        "text): both models read the same text in their own tokens, compared over aligned spans"
    )
    return PairedLM(student_tok, tok, matched, max_positions(teacher_model))


def _check_trained(cfg: Config, student: nn.Module) -> None:
    """What needs a trained input embedding: GradNorm measures each term's gradient there."""
    if cfg.weighting.strategy != "gradnorm" or student.get_input_embeddings().weight.requires_grad:
        return
    why = "student.peft: the adapters leave" if cfg.student.peft is not None else "student.freeze: it keeps"
    raise ConfigError(
        f"{why} the input embedding frozen, and GradNorm measures each term's gradient there; "
        "choose weighting.strategy static, ratio or uncertainty"
    )


def setup(
    cfg: Config, accelerator: Accelerator, say=print, inputs: Inputs | None = None, backend: Backend | None = None
) -> Run:
    """Load models and data (unless ``inputs`` holds them) and build everything the loop needs.

    ``backend``: the one this process was launched for unless given.
    """
    resolve_precision(cfg, accelerator.device)  # no-op after distill() resolved it
    backend = backend or make_backend(accelerator)
    if cfg.student.peft is not None and not backend.adapters:
        raise ConfigError(
            "student.peft: adapters train under one process or DDP, not under this launch's FSDP2 or DeepSpeed ZeRO "
            "(a LoRA student's optimizer state is small already); launch with DDP (configs/accelerate/ddp.yaml)"
        )
    task, tok, student_tok, teacher_model, student, vocab = _models(cfg, inputs, say)
    plan, side, teacher = meet_models(cfg, task, student, teacher_model, say)
    weighting = term_weighting(cfg, plan.terms)
    _check_trained(cfg, student)
    train_data, eval_data = (inputs.train_data, inputs.eval_data) if inputs else task.load_data(cfg, tok, say)
    train_data = with_teacher_rows(cfg, tok, teacher_model, train_data, say)  # data.augment, data.unlabelled
    if teacher.cache is not None:
        teacher.cache.check(cfg, train_data["input_ids"], eval_data["input_ids"], plan.teacher_needs, vocab)
    teacher.place(backend, cfg.teacher.placement, say)
    rank, world = accelerator.process_index, accelerator.num_processes
    sources = Sources(cfg, tok, train_data, student, teacher, rank=rank, world=world, say=say)
    weighting.to(accelerator.device)
    backend.shard(side, say)  # before the optimizer: sharding replaces parameters
    optimizer = _optimizer(cfg, side, weighting, backend)
    horizon, scheduler = _schedule(cfg, optimizer)
    keep_whole = side.head.params() if side.head is not None else ()
    wrapped, optimizer = backend.wrap(side, optimizer, cfg, say, keep_whole=keep_whole)
    sampler = BlockSampler(
        train_data["input_ids"].shape[0],
        cfg.train.batch_size,
        cfg.train.seed,
        rank=rank,
        world_size=world,
    )
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        backend=backend,
        tokenizer=tok,
        student_tokenizer=student_tok or tok,
        teacher=teacher,
        side=wrapped,
        terms=plan.terms,
        weighting=weighting,
        optimizer=optimizer,
        scheduler=scheduler,
        train_data=train_data,
        eval_data=eval_data,
        sampler=sampler,
        sources=sources,
        vocab=vocab,
        task=task,
        out=Path(cfg.train.output_dir),
        horizon=horizon,
    )
