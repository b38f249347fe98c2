"""A whole distillation run: set-up (models, data, plan, optimizer), the loop, the saved student and summary.

``distill(cfg)`` is the run. ``setup`` builds everything once into a ``Run``;
the loop (``engine.loop``) and the step (``engine.step``) read it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn

from alignkd.cache.read import TeacherCache
from alignkd.config import Config, to_dict, validate
from alignkd.data import BlockSampler
from alignkd.engine import zero
from alignkd.engine.capture import Capture
from alignkd.engine.choose import Inputs, choose_blocks
from alignkd.engine.distributed import (
    full_state,
    is_sharded,
    make_accelerator,
    place_teacher,
    shard_student,
    shards_student,
)
from alignkd.engine.horizon import Horizon
from alignkd.engine.output_dir import check_output, check_resumable, clear
from alignkd.engine.plan import StudentSide, build_plan, unwrap
from alignkd.engine.tasks import TASKS, heldout
from alignkd.engine.weighting import Weighting, build_weighting
from alignkd.errors import ConfigError
from alignkd.models import check_tokenizers, common_vocab, load_model, load_tokenizer
from alignkd.models.families import OutputHead, blocks_of, disable_attention_dropout, output_head
from alignkd.models.loading import check_positions, load_skeleton
from alignkd.models.select import Selection, calibration_rows, write_scores
from alignkd.models.student import build_student, freeze, param_count
from alignkd.precision import (
    bf16_support,
    default_device,
    resolve_dtype,
    resolve_mixed_precision,
    resolve_student_dtype,
)
from alignkd.terms import TERM_TYPES, Term


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    tokenizer: object
    teacher: nn.Module
    teacher_capture: Capture
    side: nn.Module
    """``StudentSide``, wrapped by Accelerate (DDP etc.) or by a DeepSpeed engine (``engine.zero``)."""
    terms: list[Term]
    weighting: Weighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_data: dict[str, torch.Tensor]
    eval_data: dict[str, torch.Tensor]
    sampler: BlockSampler
    vocab: int
    task: object
    """The task object (``engine.tasks``)."""
    out: Path
    horizon: Horizon
    """When training ends (``train.steps`` or ``train.max_minutes``); the schedules read its ``total``."""
    heads: tuple[OutputHead, OutputHead] | None = None
    """(student, teacher) output heads when the run fuses them into the output terms."""
    cache: TeacherCache | None = None
    """The teacher cache (``teacher.cache``) the run reads instead of running the teacher."""
    selection: Selection | None = None
    """How the student's blocks were chosen (``student.from_teacher.select``), when the run chose them."""
    whole_params: list[nn.Parameter] | None = None
    """Under an FSDP launch, the side's parameters left whole on every process (the blocks' are sharded); None otherwise."""

    @property
    def needs_teacher(self) -> bool:
        """False for a run of ground-truth terms only (a baseline): then the teacher never runs."""
        return any(TERM_TYPES[t.cfg.type].uses_teacher for t in self.terms)

    @property
    def unwrapped(self) -> StudentSide:
        return unwrap(self.side)

    def evaluate(self, model: nn.Module) -> dict:
        """Held-out loss (and perplexity, or accuracy) of ``model`` on the eval data."""
        t = self.cfg.train
        return heldout(
            self.task,
            model,
            self.eval_data,
            self.tokenizer,
            batch_size=t.batch_size,
            batches=t.eval_batches,
            device=self.accelerator.device,
            autocast=self.accelerator.autocast,
        )


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """Turn every ``auto`` precision of ``cfg`` into what is fast on ``device``, in place; returns the run's precision line.

    The resolved values are what ``config.yaml`` records, so a rerun elsewhere is exact.
    """
    # Probe the hardware only when asked to choose: the probe runs a bf16 matmul.
    auto = "auto" in (cfg.teacher.dtype, cfg.train.mixed_precision)
    why = bf16_support(device).reason if auto else "as configured"
    cfg.teacher.dtype = resolve_dtype(cfg.teacher.dtype, device)
    cfg.student.dtype = resolve_student_dtype(cfg.student.dtype)
    cfg.train.mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, device)
    return (
        f"precision: teacher {cfg.teacher.dtype}, student {cfg.student.dtype}, "
        f"autocast {cfg.train.mixed_precision} ({device.type}: {why})"
    )


def lr_lambda(warmup: int, horizon: Horizon, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` at the horizon's projected last step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min((step - warmup) / max(horizon.total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def fine_tunes_teacher(cfg: Config) -> bool:
    """The student is the teacher's checkpoint and no term reads the teacher: its forward never runs."""
    return cfg.student.path == cfg.teacher.path and not any(TERM_TYPES[t.type].uses_teacher for t in cfg.losses)


PRUNE_CALIBRATION = 64  # training blocks a width-pruned student's channels are ranked on


def _calibration(cfg: Config, tok, inputs: Inputs | None, teacher: nn.Module) -> torch.Tensor | None:
    """``[N, T]`` training blocks to rank the teacher's channels on, when the student is pruned by activations; else None."""
    s = cfg.student
    if s.config is None or s.init != "prune" or s.importance != "activation":
        return None
    data = inputs.train_data if inputs else TASKS[cfg.teacher.task].load_data(copy.deepcopy(cfg), tok)[0]
    teacher.to(default_device())  # the calibration forward runs where the teacher will
    return calibration_rows(data, PRUNE_CALIBRATION, cfg.train.seed)["input_ids"]


def _models(cfg: Config, teacher_weights: bool | None = None, inputs: Inputs | None = None):
    """Tokenizer, frozen teacher, student, and the logit columns they share.

    Without ``teacher_weights`` the teacher is left on the meta device: its
    structure, no weights. By default that is when the run reads a teacher cache,
    or when the student is the teacher's own checkpoint trained on the ground
    truth alone (``alignkd finetune``). A student copied from the teacher still
    needs them, so the teacher is then loaded, copied from and emptied.
    ``inputs``: tokenizer and teacher already loaded.
    """
    task = cfg.teacher.task
    weights = not (cfg.teacher.cache or fine_tunes_teacher(cfg)) if teacher_weights is None else teacher_weights
    tok = (
        inputs.tokenizer
        if inputs
        else load_tokenizer(cfg.teacher.path, what="teacher", trust_remote_code=cfg.teacher.trust_remote_code)
    )
    copies_teacher = cfg.student.from_teacher is not None or (
        cfg.student.config is not None and cfg.student.init == "prune"
    )
    if inputs:
        teacher = inputs.teacher
    elif weights or copies_teacher:
        teacher = load_model(
            cfg.teacher.path,
            task=task,
            dtype=cfg.teacher.dtype,
            what="teacher",
            trust_remote_code=cfg.teacher.trust_remote_code,
        )
    else:
        teacher = load_skeleton(
            cfg.teacher.path, task=task, what="teacher", trust_remote_code=cfg.teacher.trust_remote_code
        )
    teacher = freeze(teacher)
    student = build_student(cfg.student, teacher, task, _calibration(cfg, tok, inputs, teacher))
    if not weights:
        teacher.to("meta")  # frees the weights: the run never calls the teacher
    for model, what in ((teacher, "teacher"), (student, "student")):
        check_positions(model, cfg.data.seq_len, what)
        if task == "sequence_classification" and model.config.pad_token_id is None:
            # A classifier made from a causal LM checkpoint finds each text's last token by the pad id.
            model.config.pad_token_id = tok.pad_token_id
    if cfg.student.path is not None:
        try:
            check_tokenizers(tok, load_tokenizer(cfg.student.path, what="student"))
        except ValueError as e:
            if "no tokenizer found" not in str(e):
                raise
    vocab = common_vocab(teacher, student, tok) if task != "sequence_classification" else 0
    return tok, teacher, student, vocab


def fused_heads(cfg: Config, task, student: nn.Module, teacher: nn.Module) -> tuple[OutputHead, OutputHead] | None:
    """The two output heads when the output terms can skip the logits, else None.

    Needs ``train.fused_head``, a causal LM, every logit-reading term able to run
    fused (kl, ce; not dkd or blockwise), and both families' logits a plain head
    with the same soft-capping.

    Fused, the terms never hold ``[tokens, V]`` logits, but each walk over the
    student's head makes its logits again and pushes each output's gradient through
    the head, where on logits the step makes them once and sums the terms'
    gradients before one backward through the head. Under autocast one walk per
    micro-batch costs about what the logits do, so a run fuses when its output
    terms take one walk: one term, or the first KL term on a live teacher with the
    first CE term, which share one (``lm_head_kl_ce``); a run that needs more (a
    second KL or CE term, or KL + CE from a teacher cache, whose KL walks alone)
    keeps the logits. Float32 runs fuse whatever the number of walks: there the
    logits and their gradient are the largest tensors of the step.
    """
    kinds = [TERM_TYPES[t.type] for t in cfg.losses]
    if not cfg.train.fused_head or task.name != "causal_lm" or any(k.reads_logits and not k.fused for k in kinds):
        return None
    walks = sum(k.reads_logits for k in kinds)
    if {"kl", "ce"} <= {t.type for t in cfg.losses} and not cfg.teacher.cache:
        walks -= 1  # one KL and one CE share a walk (terms.outputs._from_one_walk)
    if cfg.train.mixed_precision != "no" and walks > 1:
        return None
    s, t = output_head(student), output_head(teacher)
    if s is None or t is None or s.softcap != t.softcap:
        return None
    return s, t


def _optimizer(cfg: Config, side: nn.Module, weighting: Weighting) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the weighting's own parameters."""
    decay, no_decay = [], []
    for name, p in side.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = []
    for params, wd in ((decay, cfg.train.weight_decay), (no_decay + weighting.model_params(), 0.0)):
        # AdamW's foreach maths cannot mix shards (an FSDP student's blocks) and whole tensors in a group.
        for part in ([p for p in params if not is_sharded(p)], [p for p in params if is_sharded(p)]):
            if part:
                groups.append({"params": part, "weight_decay": wd})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95))


def setup(cfg: Config, accelerator: Accelerator, say=print, inputs: Inputs | None = None) -> Run:
    """Load models and data (unless ``inputs`` holds them), choose the student's blocks if asked, and build everything the loop needs."""
    resolve_precision(cfg, accelerator.device)  # no-op after distill() resolved it
    task = TASKS[cfg.teacher.task]
    selection, inputs = choose_blocks(cfg, accelerator, setup, say) if inputs is None else (None, inputs)
    tok, teacher, student, vocab = _models(cfg, inputs=inputs)
    plan = build_plan(cfg.losses, student, teacher)
    if plan.needs_eager_attention:
        say("[yellow]attention loss: switching both models to eager attention (slower, O(T^2) memory per layer)[/]")
        for m in (teacher, student):
            m.set_attn_implementation("eager")
        disable_attention_dropout(student)
    teacher_capture = Capture(teacher, plan.teacher_needs)
    side = StudentSide(student, plan.student_needs, plan.projectors, plan.mixes)
    cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    # With a cache only the student's head is read (the teacher's stays on the meta device).
    heads = fused_heads(cfg, task, student, teacher)
    side.fused_head = heads is not None
    w = cfg.weighting
    weighting = build_weighting(
        w.strategy,
        [t.cfg.name for t in plan.terms],
        [t.cfg.weight for t in plan.terms],
        alpha=w.alpha,
        lr=w.lr,
        every=w.every,
        kinds=[t.cfg.type for t in plan.terms],
    )
    train_data, eval_data = (inputs.train_data, inputs.eval_data) if inputs else task.load_data(cfg, tok, say)
    if cache is not None:
        cache.check(cfg, train_data["input_ids"], eval_data["input_ids"], plan.teacher_needs, vocab)
    if next(teacher.parameters()).device.type != "meta":  # a teacher that never runs is not placed
        teacher = place_teacher(
            teacher, accelerator, cfg.teacher.placement, say, keep_whole=heads[1].params() if heads else ()
        )
    weighting.to(accelerator.device)
    whole = (
        shard_student(side, accelerator, say) if shards_student() else None
    )  # before the optimizer: it replaces parameters
    optimizer = _optimizer(cfg, side, weighting)
    max_seconds = cfg.train.max_minutes * 60 if cfg.train.max_minutes is not None else None
    horizon = Horizon(cfg.train.steps, max_seconds)
    # Stepped by hand once per optimizer step (Accelerate's wrapper would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup, horizon, cfg.train.min_lr_ratio)
    )
    if whole is not None:
        optimizer = accelerator.prepare(optimizer)
    elif settings := zero.launch_zero():
        side = zero.wrap(
            side,
            optimizer,
            settings,
            cfg,
            accelerator.num_processes,
            say,
            keep_whole=heads[0].params() if heads else (),
        )
        optimizer = side.optimizer  # ZeRO's, stepping the AdamW's groups the scheduler drives
    else:
        side, optimizer = accelerator.prepare(side, optimizer)
    sampler = BlockSampler(
        train_data["input_ids"].shape[0],
        cfg.train.batch_size,
        cfg.train.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    return Run(
        cfg,
        accelerator,
        tok,
        teacher,
        teacher_capture,
        side,
        plan.terms,
        weighting,
        optimizer,
        scheduler,
        train_data,
        eval_data,
        sampler,
        vocab,
        task,
        Path(cfg.train.output_dir),
        horizon,
        heads,
        cache,
        selection,
        whole,
    )


def save_outputs(run: Run) -> Path:
    """``OUTPUT_DIR/student/`` (loadable with transformers alone) and ``projectors.safetensors``."""
    acc = run.accelerator
    acc.wait_for_everyone()
    dest = run.out / "student"
    # A sharded student is gathered whole first (every process takes part); ZeRO's parameters are views of its flat buffers.
    state, aux = full_state(run.unwrapped.student) if run.whole_params is not None else None, run.unwrapped.aux_state()
    state, aux = zero.export_states(run.side) if zero.is_engine(run.side) else (state, aux)
    if acc.is_main_process:
        from alignkd.engine.checkpoint import replace_dir

        tmp = run.out / ".student.tmp"  # written whole, then renamed into place
        shutil.rmtree(tmp, ignore_errors=True)
        run.unwrapped.student.save_pretrained(tmp, state_dict=state)
        run.tokenizer.save_pretrained(tmp)
        replace_dir(tmp, dest)
        aux = {k: v.detach().cpu().contiguous() for k, v in aux.items()}
        if aux:
            save_file(aux, str(run.out / "projectors.safetensors"))
    acc.wait_for_everyone()
    return dest


def distill(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run a whole distillation; returns a summary (also written to ``OUTPUT_DIR/summary.json``).

    An output folder that already holds a run needs ``resume`` (continue it, with
    a config that computes the same) or ``overwrite`` (replace it).
    """
    from alignkd.engine.checkpoint import resume_latest
    from alignkd.engine.loop import train

    validate(cfg)  # a Config changed after it was built is checked again
    out = Path(cfg.train.output_dir)
    check_output(out, resume, overwrite)
    # Accelerate keeps its settings in a process-wide singleton; a second run in the
    # same process (the demo's baseline, a notebook) may ask for other precision.
    # Resetting it keeps the process group of a distributed launch.
    AcceleratorState._reset_state(reset_partial_state=False)
    precision = resolve_precision(cfg, default_device())
    accelerator = make_accelerator(cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    say = _say(accelerator)
    notes: list[str] = []  # setup's notes wait too: bad input gets its one line and nothing else
    run = setup(cfg, accelerator, notes.append)  # bad input stops here, before the output folder is touched
    saved = out / "config.yaml"
    if resume and saved.is_file():
        check_resumable(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    say(precision)  # the run's first line, once nothing can stop it any more
    for note in notes:
        say(note)
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"train.output_dir {out}: cannot create it ({e.strerror}); choose a writable folder"
            ) from None
        if overwrite:
            clear(out)
        saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if run.selection is not None:
            write_scores(run.selection, out)
    accelerator.wait_for_everyone()
    teacher_eval = _teacher_eval(run, say)  # before a resume replaces the student's weights
    start = resume_latest(run, say) if resume else 0
    student = run.unwrapped.student
    say(
        f"teacher {param_count(run.teacher) / 1e6:.2f}M params ({len(blocks_of(run.teacher))} blocks), "
        f"student {param_count(student) / 1e6:.2f}M ({len(blocks_of(student))} blocks); "
        f"{run.train_data['input_ids'].shape[0]} training blocks; terms: {', '.join(run.weighting.names)}"
    )
    t0 = time.perf_counter()
    last = train(run, start) if start < cfg.train.steps else {"train": {}, "eval": run.evaluate(student)}
    student_dir = save_outputs(run)
    summary = {
        "steps": last["train"].get("step", start),
        "train_seconds": time.perf_counter() - t0,
        "teacher_params": param_count(run.teacher),
        "student_params": param_count(student),
        "teacher_eval": teacher_eval,
        "student_eval": last["eval"],
        "last_train": last["train"],
        "student_dir": str(student_dir),
        "precision": {
            "teacher_dtype": cfg.teacher.dtype,
            "student_dtype": cfg.student.dtype,
            "mixed_precision": cfg.train.mixed_precision,
        },
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def select_blocks(cfg: Config, say=print) -> tuple[Selection, Path]:
    """``alignkd prune``: choose the student's blocks as the config says (listed ``layers`` are chosen anew), and write ``block_scores.json``."""
    validate(cfg)
    AcceleratorState._reset_state(reset_partial_state=False)
    notes = [resolve_precision(cfg, default_device())]  # said once nothing can stop it: bad input gets one line
    accelerator = make_accelerator(cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    selection, _ = choose_blocks(cfg, accelerator, setup, notes.append, again=True)
    for note in notes:
        say(note)
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    return selection, write_scores(selection, cfg.train.output_dir)


def _teacher_eval(run: Run, say) -> dict:
    """The teacher's held-out numbers: measured, read from the teacher cache, or, when the
    student starts as the teacher's checkpoint and the teacher never runs, the student's at step 0."""
    if run.cache is not None:  # measured when the cache was built, on the same eval data
        meta, cfg = run.cache.meta, run.cfg
        blocks = min(run.eval_data["input_ids"].shape[0], cfg.train.batch_size * cfg.train.eval_batches)
        if blocks != meta["teacher_eval_blocks"]:
            say(
                f"teacher held-out numbers from the cache: {meta['teacher_eval_blocks']} eval blocks (the student's: {blocks})"
            )
        return meta["teacher_eval"]
    if next(run.teacher.parameters()).device.type == "meta":
        return run.evaluate(run.unwrapped.student)
    return run.evaluate(run.teacher)


def _say(accelerator: Accelerator):
    from rich.console import Console

    console = Console(stderr=True)

    def say(msg: str) -> None:
        if accelerator.is_main_process:
            console.print(msg)

    return say
