"""The distillation loop: teacher -> student -> losses -> weights -> step, on Accelerate.

``distill(cfg)`` is the whole run. ``setup`` builds everything once; ``train``
is the loop a person reads top to bottom. Two places are meant to be swapped by
later features and are kept small for it: ``teacher_forward`` (an offline
teacher cache) and the term functions of ``terms.py`` (a chunked LM-head KL).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from alignkd.capture import Capture, Record
from alignkd.config import Config, to_dict
from alignkd.data import BlockSampler, build_classification_data, build_lm_data, resolve_bos
from alignkd.families import blocks_of, disable_attention_dropout
from alignkd.horizon import Horizon
from alignkd.models import check_tokenizers, common_vocab, load_model as load_hf_model, load_tokenizer
from alignkd.plan import StudentSide, build_plan
from alignkd.precision import bf16_support, default_device, resolve_dtype, resolve_mixed_precision, resolve_student_dtype
from alignkd.progress import Progress
from alignkd.student import build_student, freeze, param_count
from alignkd.terms import TERMS, StepTensors, Term
from alignkd.weighting import Weighting, build_weighting, schedule_value


@dataclass
class Batch:
    input_ids: torch.Tensor
    """``[B, T]`` token ids (masked-LM: with [MASK] substitutions)."""
    mask: torch.Tensor
    """``[B, T]`` bool, True on real tokens."""
    labels: torch.Tensor | None = None
    """``[B]`` classes, or ``[B, T]`` masked-LM targets (-100 = not predicted); None for causal LM."""

    def counted(self, task: str) -> int:
        """Positions the token-level losses average over (the grad-accumulation normaliser)."""
        if task == "sequence_classification":
            return self.input_ids.shape[0]
        if task == "masked_lm":
            return int((self.labels != -100).sum())
        return int(self.mask.sum())


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    tokenizer: object
    teacher: nn.Module
    teacher_capture: Capture
    side: nn.Module
    """``StudentSide``, wrapped by Accelerate (DDP etc.)."""
    terms: list[Term]
    weighting: Weighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_data: dict[str, torch.Tensor]
    eval_data: dict[str, torch.Tensor]
    sampler: BlockSampler
    vocab: int
    task: str
    out: Path
    horizon: Horizon
    """When training ends (``train.steps`` or ``train.max_minutes``); the schedules read its ``total``."""

    @property
    def needs_teacher(self) -> bool:
        """False for a plain cross-entropy run (a baseline): then the teacher never runs."""
        return any(t.cfg.type != "ce" for t in self.terms)

    @property
    def unwrapped(self) -> StudentSide:
        return self.accelerator.unwrap_model(self.side)


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """Turn every ``auto`` precision of ``cfg`` into what is fast on ``device``, in place; returns the run's precision line.

    The resolved values are what ``config.yaml`` records, so a rerun elsewhere is
    exact.
    """
    support = bf16_support(device)
    cfg.teacher.dtype = resolve_dtype(cfg.teacher.dtype, device)
    cfg.student.dtype = resolve_student_dtype(cfg.student.dtype)
    cfg.train.mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, device)
    return (
        f"precision: teacher {cfg.teacher.dtype}, student {cfg.student.dtype}, "
        f"autocast {cfg.train.mixed_precision} ({device.type}: {support.reason})"
    )


def _lr_lambda(warmup: int, horizon: Horizon, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` at the horizon's projected last step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min((step - warmup) / max(horizon.total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _load_data(cfg: Config, tokenizer) -> tuple[dict, dict]:
    d = cfg.data
    if cfg.teacher.task == "sequence_classification":
        c = build_classification_data(
            d.train, tokenizer, seq_len=d.seq_len, eval=d.eval, eval_fraction=d.eval_fraction,
            text_field=d.text_field, label_field=d.label_field, seed=cfg.train.seed,
        )
        return (
            {"input_ids": c.train_ids, "mask": c.train_mask, "labels": c.train_labels},
            {"input_ids": c.eval_ids, "mask": c.eval_mask, "labels": c.eval_labels},
        )
    bos_id = resolve_bos(d.bos, tokenizer)
    d.bos = "never" if bos_id is None else "always"  # config.yaml records what auto chose
    lm = build_lm_data(
        d.train, tokenizer, seq_len=d.seq_len, eval=d.eval, eval_fraction=d.eval_fraction,
        text_field=d.text_field, max_train_tokens=d.max_train_tokens, seed=cfg.train.seed, bos_id=bos_id,
    )
    return {"input_ids": lm.train}, {"input_ids": lm.eval}


def setup(cfg: Config, accelerator: Accelerator, say=print) -> Run:
    """Load models and data and build everything the loop needs."""
    resolve_precision(cfg, accelerator.device)  # no-op after distill() resolved it
    task = cfg.teacher.task
    tok = load_tokenizer(cfg.teacher.path, what="teacher", trust_remote_code=cfg.teacher.trust_remote_code)
    teacher = freeze(load_hf_model(cfg.teacher.path, task=task, dtype=cfg.teacher.dtype, what="teacher", trust_remote_code=cfg.teacher.trust_remote_code))
    student = build_student(cfg.student, teacher, task)
    if cfg.student.path is not None:
        try:
            check_tokenizers(tok, load_tokenizer(cfg.student.path, what="student"))
        except ValueError as e:
            if "no tokenizer found" not in str(e):
                raise
    vocab = common_vocab(teacher, student, tok) if task != "sequence_classification" else 0
    plan = build_plan(cfg.losses, student, teacher)
    if plan.needs_eager_attention:
        say("[yellow]attention loss: switching both models to eager attention (slower, O(T^2) memory per layer)[/]")
        for m in (teacher, student):
            m.set_attn_implementation("eager")
        disable_attention_dropout(student)
    teacher_capture = Capture(teacher, plan.teacher_needs)
    side = StudentSide(student, plan.student_needs, plan.projectors, plan.mixes)
    names = [t.cfg.name for t in plan.terms]
    weighting = build_weighting(
        cfg.weighting.strategy, names, [t.cfg.weight for t in plan.terms], alpha=cfg.weighting.alpha, lr=cfg.weighting.lr
    )
    train_data, eval_data = _load_data(cfg, tok)

    decay, no_decay = [], []
    for name, p in side.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay + weighting.model_params(), "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95))
    # The scheduler is stepped by hand once per optimizer step (Accelerate's
    # wrapper would step it once per process).
    max_seconds = cfg.train.max_minutes * 60 if cfg.train.max_minutes is not None else None
    horizon = Horizon(cfg.train.steps, max_seconds)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.train.warmup, horizon, cfg.train.min_lr_ratio))
    teacher.to(accelerator.device)
    weighting.to(accelerator.device)
    side, optimizer = accelerator.prepare(side, optimizer)
    sampler = BlockSampler(
        train_data["input_ids"].shape[0], cfg.train.batch_size, cfg.train.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    return Run(
        cfg, accelerator, tok, teacher, teacher_capture, side, plan.terms, weighting, optimizer, scheduler,
        train_data, eval_data, sampler, vocab, task, Path(cfg.train.output_dir), horizon,
    )


# ---------------------------------------------------------------- batches


def _mlm_mask(ids: torch.Tensor, mask: torch.Tensor, tokenizer, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: 15% of real tokens are targets; 80% of those become [MASK], 10% random."""
    r = torch.rand(ids.shape, generator=gen)
    target = (r < 0.15) & mask
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    ids = ids.clone()
    r2 = torch.rand(ids.shape, generator=gen)
    ids[target & (r2 < 0.8)] = tokenizer.mask_token_id
    rand = target & (r2 >= 0.8) & (r2 < 0.9)
    ids[rand] = torch.randint(len(tokenizer), ids.shape, generator=gen)[rand]
    return ids, labels


def make_batch(run: Run, data: dict, idx: torch.Tensor, seed: int) -> Batch:
    ids = data["input_ids"][idx]
    mask = data["mask"][idx].bool() if "mask" in data else torch.ones_like(ids, dtype=torch.bool)
    labels = data["labels"][idx] if "labels" in data else None
    if run.task == "masked_lm":
        ids, labels = _mlm_mask(ids, mask, run.tokenizer, torch.Generator().manual_seed(seed))
    dev = run.accelerator.device
    return Batch(ids.to(dev), mask.to(dev), labels.to(dev) if labels is not None else None)


# ---------------------------------------------------------------- the step


def teacher_forward(run: Run, batch: Batch) -> Record:
    """Frozen teacher under inference mode; returns its logits and captured tensors."""
    with torch.inference_mode():
        out = run.teacher(input_ids=batch.input_ids, attention_mask=batch.mask.long())
    rec = run.teacher_capture.take()
    rec.logits = out.logits
    return rec


def term_losses(run: Run, batch: Batch, student: Record, teacher: Record) -> dict[str, torch.Tensor]:
    x = StepTensors(
        input_ids=batch.input_ids, mask=batch.mask, labels=batch.labels, task=run.task,
        student=student, teacher=teacher, vocab=run.vocab, side=run.unwrapped,
        teacher_model=run.teacher, teacher_capture=run.teacher_capture,
    )
    return {t.cfg.name: TERMS[t.cfg.type](t, x) for t in run.terms}


def train(run: Run, start_step: int = 0) -> dict:
    """The loop. Returns the last training and evaluation records: ``{"train": ..., "eval": ...}``."""
    cfg, acc, horizon = run.cfg, run.accelerator, run.horizon
    shared = [run.unwrapped.student.get_input_embeddings().weight]  # every term's gradient passes through here
    log_file = (run.out / "metrics.jsonl").open("a") if acc.is_main_process else None
    tb = _tensorboard(run.out) if acc.is_main_process else None
    progress = Progress(horizon.total, start_step, enabled=cfg.train.progress and acc.is_main_process)
    record: dict = {}
    ev: dict = {}
    step = start_step
    loop_start, elapsed_before = time.perf_counter(), horizon.elapsed
    try:
        while not horizon.finished(step):
            total = horizon.total
            t0 = time.perf_counter()
            data_position = run.sampler.state_dict()  # where this step's batches start, for an interrupt
            # Schedules: weight multipliers and temperatures at this step.
            mult = [schedule_value(t.cfg.weight_schedule, step, total, 1.0) for t in run.terms]
            for t in run.terms:
                t.temperature = schedule_value(t.cfg.temperature_schedule, step, total, t.cfg.temperature)
            micro = [make_batch(run, run.train_data, run.sampler.next_indices(), seed=cfg.train.seed * 100003 + step * 131 + k) for k in range(cfg.train.grad_accum)]
            counts = [b.counted(run.task) for b in micro]
            # Normalise by the global number of counted positions over micro-batches and
            # processes; DDP averages gradients over processes, hence the world size.
            global_count = acc.reduce(torch.tensor(float(sum(counts)), device=acc.device), "sum").item()
            sums: dict[str, torch.Tensor] = {}  # tensors: no device sync per term
            for k, batch in enumerate(micro):
                teacher_rec = teacher_forward(run, batch) if run.needs_teacher else Record()
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = acc.no_sync(run.side) if k < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with acc.autocast():
                        student_rec = run.side(batch.input_ids, batch.mask)
                        losses = term_losses(run, batch, student_rec, teacher_rec)
                    if k == 0 and cfg.weighting.strategy == "gradnorm" and step % cfg.weighting.every == 0:
                        run.weighting.update(losses, mult, shared, reduce=lambda v: acc.reduce(v, "sum"))
                    loss = run.weighting.combine(losses, mult)
                    acc.backward(loss * (counts[k] * acc.num_processes / max(global_count, 1.0)))
                for name, v in [*losses.items(), ("loss", loss)]:
                    sums[name] = sums.get(name, 0.0) + v.detach().double() * counts[k]
            # With clipping off, an infinite bound still returns the norm for the log.
            grad_norm = acc.clip_grad_norm_(run.side.parameters(), cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf)
            lr = run.scheduler.get_last_lr()[0]
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - t0
            tokens = sum(int(b.mask.sum()) for b in micro) * acc.num_processes
            # Logged losses are token-weighted means over all micro-batches and processes.
            keys = ["loss", *run.weighting.names]
            totals = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), "sum").tolist()
            means = {k: float(v) / max(global_count, 1.0) for k, v in zip(keys, totals)}
            record = {"split": "train", "step": step + 1, "loss": means["loss"]}
            record.update({f"loss/{n}": means[n] for n in run.weighting.names})
            record.update(run.weighting.log())
            record.update({f"temperature/{t.cfg.name}": t.temperature for t in run.terms if t.temperature is not None and t.cfg.temperature_schedule})
            record.update({"lr": lr, "tokens_per_s": tokens / seconds, "step_s": seconds})
            record["grad_norm"] = float(grad_norm)
            elapsed = elapsed_before + time.perf_counter() - loop_start
            if horizon.max_seconds is not None:  # every process must agree on the last step
                elapsed = acc.reduce(torch.tensor(elapsed, device=acc.device), "max").item()
            horizon.advance(step + 1, elapsed)
            last = horizon.finished(step + 1)
            progress.update(step + 1, record, total=horizon.total)
            if log_file and ((step + 1) % cfg.train.log_every == 0 or last):
                _write(log_file, tb, record)
            if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or last:
                ev = evaluate(run, run.unwrapped.student)
                ev.update({"split": "eval", "step": step + 1})
                progress.note(ev)
                if log_file:
                    _write(log_file, tb, ev)
            if (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0) or last:
                save_checkpoint(run, step + 1)
            step += 1
    except KeyboardInterrupt:
        # Never lose work: keep what the finished steps learned, then stop.
        progress.stop()
        if step > start_step:
            run.sampler.load_state_dict(data_position)  # the unfinished step's batches come again
            save_checkpoint(run, step)
            print(f"interrupted: saved a checkpoint at step {step}; continue with --resume")
        raise
    finally:
        progress.stop()
        if log_file:
            log_file.close()
        if tb:
            tb.close()
    return {"train": record, "eval": ev}


def _write(log_file, tb, record: dict) -> None:
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    if tb is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                tb.add_scalar(f"{record['split']}/{k}", v, record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run: Run, model: nn.Module) -> dict:
    """Held-out loss (and perplexity, or accuracy for classifiers) of ``model`` on the eval data."""
    was_training = model.training
    model.eval()
    data = run.eval_data
    n = data["input_ids"].shape[0]
    bs = run.cfg.train.batch_size
    total_loss, total_count, correct = 0.0, 0, 0
    for i, start in enumerate(range(0, min(n, bs * run.cfg.train.eval_batches), bs)):
        idx = torch.arange(start, min(start + bs, n))
        batch = make_batch(run, data, idx, seed=10_000 + i)
        with run.accelerator.autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.mask.long()).logits.float()
        if run.task == "sequence_classification":
            total_loss += nn.functional.cross_entropy(logits, batch.labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == batch.labels).sum())
            total_count += batch.labels.numel()
            continue
        if run.task == "masked_lm":
            tgt, has = batch.labels, batch.labels != -100
        else:
            tgt, has = batch.input_ids[:, 1:], (batch.mask[:, 1:] & batch.mask[:, :-1])
            logits = logits[:, :-1]
        total_loss += nn.functional.cross_entropy(logits[has], tgt[has], reduction="sum").item()
        total_count += int(has.sum())
    model.train(was_training)
    if total_count == 0:
        return {"eval_loss": float("nan")}
    out = {"eval_loss": total_loss / total_count}
    if run.task == "sequence_classification":
        out["eval_accuracy"] = correct / total_count
    else:
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
    return out


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Run, step: int) -> Path:
    """``OUTPUT_DIR/checkpoints/step-N/``: student + projectors, optimizer, scheduler, weighting, RNG, data position."""
    acc = run.accelerator
    acc.wait_for_everyone()
    path = run.out / "checkpoints" / f"step-{step}"
    if acc.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        save_model(run.unwrapped, str(path / "side.safetensors"))  # student and projectors; handles tied weights
        torch.save(
            {
                "step": step,
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "weighting": run.weighting.state_dict(),
                "rng": _rng_state(),
                "sampler": run.sampler.state_dict(),
                "train_seconds": run.horizon.elapsed,
            },
            path / "state.pt",
        )
        old = sorted(_checkpoints(run.out), key=lambda p: int(p.name.split("-")[1]))
        for stale in old[: max(len(old) - run.cfg.train.keep_checkpoints, 0)]:
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    return path


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return [p for p in root.glob("step-*") if (p / "state.pt").is_file()] if root.is_dir() else []


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = _checkpoints(out)
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None


def load_checkpoint(run: Run, path: Path) -> int:
    """Restore a checkpoint into ``run``; returns the step to continue from."""
    load_model(run.unwrapped, str(path / "side.safetensors"), device=str(run.accelerator.device))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.weighting.load_state_dict(state["weighting"])
    run.sampler.load_state_dict(state["sampler"])
    _set_rng_state(state["rng"])
    step = int(state["step"])
    run.horizon.resume(step, float(state.get("train_seconds", 0.0)))
    return step


# ---------------------------------------------------------------- the whole run


def save_outputs(run: Run) -> Path:
    """``OUTPUT_DIR/student/`` (loadable with transformers alone) and ``projectors.safetensors``."""
    acc = run.accelerator
    acc.wait_for_everyone()
    dest = run.out / "student"
    if acc.is_main_process:
        student = run.unwrapped.student
        student.save_pretrained(dest)
        run.tokenizer.save_pretrained(dest)
        aux = {k: v.detach().cpu().contiguous() for k, v in run.unwrapped.aux_state().items()}
        if aux:
            save_file(aux, str(run.out / "projectors.safetensors"))
    acc.wait_for_everyone()
    return dest


def distill(cfg: Config, *, resume: bool = False) -> dict:
    """Run a whole distillation; returns a summary (also written to ``OUTPUT_DIR/summary.json``)."""
    # Accelerate keeps its settings in a process-wide singleton; a second run in the
    # same process (the demo's baseline, a notebook) may ask for other precision.
    # Resetting it keeps the process group of a distributed launch.
    AcceleratorState._reset_state(reset_partial_state=False)
    precision = resolve_precision(cfg, default_device())
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    say = _say(accelerator)
    run = setup(cfg, accelerator, say)  # bad input stops here, before the output folder is touched
    say(precision)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    start = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            say(f"[yellow]--resume: no checkpoint under {out / 'checkpoints'}; starting from step 0[/]")
        else:
            start = load_checkpoint(run, ckpt)
            say(f"resuming from {ckpt} (step {start})")
    student = run.unwrapped.student
    teacher_eval = evaluate(run, run.teacher)
    say(
        f"teacher {param_count(run.teacher) / 1e6:.2f}M params ({len(blocks_of(run.teacher))} blocks), "
        f"student {param_count(student) / 1e6:.2f}M ({len(blocks_of(student))} blocks); "
        f"{run.train_data['input_ids'].shape[0]} training blocks; terms: {', '.join(run.weighting.names)}"
    )
    t0 = time.perf_counter()
    last = train(run, start) if start < cfg.train.steps else {"train": {}, "eval": evaluate(run, student)}
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
        "precision": {"teacher_dtype": cfg.teacher.dtype, "student_dtype": cfg.student.dtype, "mixed_precision": cfg.train.mixed_precision},
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _say(accelerator: Accelerator):
    from rich.console import Console

    console = Console(stderr=True)

    def say(msg: str) -> None:
        if accelerator.is_main_process:
            console.print(msg)

    return say
