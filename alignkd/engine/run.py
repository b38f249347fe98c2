"""A whole distillation run: set-up, the loop, the exported student and the summary (``distill``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from alignkd.align.blocks import write_scores
from alignkd.backend import make_accelerator
from alignkd.config import Config, resolve_precision, resolved, section_defaults, to_dict
from alignkd.disk import tensor_bytes
from alignkd.engine import trackers
from alignkd.engine.block_choice import choose_blocks
from alignkd.engine.checkpoint import replace_dir, resume_latest, settle_writes
from alignkd.engine.loop import train
from alignkd.engine.output_dir import check_output, check_resumable, clear, remove_leftovers
from alignkd.engine.setup import Run, setup
from alignkd.errors import ConfigError
from alignkd.models.adapters import adapter_count, has_adapters, plain_copy, save_adapter, untied_head_count
from alignkd.models.card import model_card
from alignkd.models.families import blocks_of
from alignkd.models.student import param_count
from alignkd.precision import default_device


def save_outputs(run: Run) -> Path:
    """``OUTPUT_DIR/student/`` (loadable with transformers alone) and ``projectors.safetensors``.

    Both are written under temporary names and renamed into place once whole; a full
    disk is one line naming the last good checkpoint, which ``--resume`` exports.
    """
    acc = run.accelerator
    acc.wait_for_everyone()
    dest = run.out / "student"
    tmps = [run.out / ".student.tmp", run.out / ".projectors.safetensors.tmp"]
    # Split weights are gathered whole first (every process takes part).
    state, aux = run.backend.export(run.side)
    failed: Exception | None = None
    if acc.is_main_process:
        try:
            _write_outputs(run, state, aux, *tmps)
        except Exception as e:  # raised by settle_writes, which every process reaches
            failed = e
    what, then = "the exported student", "run the same command with --resume, which exports it"
    settle_writes(run, failed, tmps, what, dest, lambda: _export_bytes(run, state, aux), then=then)
    return dest


def _write_outputs(run: Run, state, aux: dict, tmp: Path, projectors: Path) -> None:
    """The main process's part of the export: each file whole under its temporary name, then renamed."""
    shutil.rmtree(tmp, ignore_errors=True)
    student = run.unwrapped.student
    if has_adapters(student):
        _write_adapted(run, tmp)
    else:
        student.save_pretrained(tmp, state_dict=state)
    run.student_tokenizer.save_pretrained(tmp)
    aux = {k: v.detach().cpu().contiguous() for k, v in aux.items()}
    if aux:
        save_file(aux, str(projectors))
    replace_dir(tmp, run.out / "student")
    if aux:
        os.replace(projectors, run.out / "projectors.safetensors")


def _write_adapted(run: Run, tmp: Path) -> None:
    """A PEFT student's export (one process or DDP, so the main process holds it whole): the model with its adapters
    folded in (``student.peft.merge``), or the adapter folder with the base it names."""
    student, peft = run.unwrapped.student, run.cfg.student.peft
    if peft.merge:
        plain_copy(student).save_pretrained(tmp)
        return
    tmp.mkdir(parents=True)
    base = run.cfg.student.path
    if base is None:  # built here (from the teacher): the frozen base is saved beside the adapter
        plain_copy(student, fold=False).save_pretrained(tmp / "base")
        run.student_tokenizer.save_pretrained(tmp / "base")
        base = str((run.out / "student" / "base").resolve())  # where it will be once renamed into place
    elif Path(base).expanduser().is_dir():
        base = str(Path(base).expanduser().resolve())
    save_adapter(student, tmp, base)


def _export_bytes(run: Run, state, aux: dict) -> int:
    """About what the export takes: the student's weights and the projectors'."""
    weights = (state if state is not None else run.unwrapped.student.state_dict()).values()
    return tensor_bytes(weights) + tensor_bytes(aux.values())


def distill(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run a whole distillation; returns a summary (also written to ``OUTPUT_DIR/summary.json``).

    An output folder that already holds a run needs ``resume`` (continue it, with
    a config that computes the same) or ``overwrite`` (replace it).
    """
    resolved(cfg)  # a Config changed after it was built is resolved and checked again
    out = Path(cfg.train.output_dir)
    check_output(out, resume, overwrite)
    precision = resolve_precision(cfg, default_device())
    accelerator = make_accelerator(cfg.train.mixed_precision, trackers.chosen(cfg), out / "tensorboard")
    set_seed(cfg.train.seed)
    say = _say(accelerator)
    notes: list[str] = []  # setup's notes wait too: bad input gets its one line and nothing else
    # Bad input stops in these two, before the output folder is touched.
    selection, inputs = choose_blocks(cfg, accelerator, notes.append)
    run = setup(cfg, accelerator, notes.append, inputs)
    saved = out / "config.yaml"
    if resume and saved.is_file():
        check_resumable(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), section_defaults())
    say(precision)  # the run's first line, once nothing can stop it any more
    for note in notes:
        say(note)
    if accelerator.is_main_process:
        _prepare_output(out, cfg, overwrite, selection)
    accelerator.wait_for_everyone()
    teacher_eval = run.teacher.heldout(
        run.evaluate, run.unwrapped.student, _eval_blocks(run), say
    )  # before a resume replaces the student's weights
    start = resume_latest(run, say) if resume else 0
    student = run.unwrapped.student
    say(
        f"teacher {param_count(run.teacher.model) / 1e6:.2f}M params ({len(blocks_of(run.teacher.model))} blocks), "
        f"student {_params(student) / 1e6:.2f}M ({len(blocks_of(student))} blocks" + _trained_part(student) + "); "
        f"{run.train_data['input_ids'].shape[0]} training blocks; terms: {', '.join(run.weighting.names)}"
    )
    t0 = time.perf_counter()
    with trackers.tracking(accelerator, cfg, precision, resume):
        last = train(run, start) if start < cfg.train.steps else {"train": {}, "eval": run.evaluate(student)}
    student_dir = save_outputs(run)
    summary = {
        "steps": last["train"].get("step", start),
        "train_seconds": time.perf_counter() - t0,
        "teacher_params": param_count(run.teacher.model),
        "student_params": _params(student),
        "teacher_eval": teacher_eval,
        "student_eval": last["eval"],
        "last_train": last["train"],
        "student_dir": str(student_dir),
        "precision": _precision(cfg),
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _write_card(cfg, summary, student_dir, say)
    return summary


def _write_card(cfg: Config, summary: dict, student_dir: Path, say) -> None:
    """``student/README.md``: the model card (a failure to write it loses nothing else, so it is one warning)."""
    from alignkd import __version__

    card = model_card(
        name=Path(cfg.train.output_dir).resolve().name,  # the run folder's name
        teacher=cfg.teacher.path,
        task=cfg.teacher.task,
        config=to_dict(cfg),
        teacher_eval=summary["teacher_eval"] or {},
        student_eval=summary["student_eval"] or {},
        teacher_params=summary["teacher_params"],
        student_params=summary["student_params"],
        steps=summary["steps"],
        version=__version__,
    )
    try:
        (student_dir / "README.md").write_text(card, encoding="utf-8")
    except OSError as e:
        say(f"[yellow]model card: could not write {student_dir / 'README.md'} ({e.strerror}); the student is saved[/]")


def _prepare_output(out: Path, cfg: Config, overwrite: bool, selection) -> None:
    """Create (or clear) the output folder and write ``config.yaml`` and the block scores (main process)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"train.output_dir {out}: cannot create it ({e.strerror}); choose a writable folder"
        ) from None
    if overwrite:
        clear(out)
    remove_leftovers(out)  # of a write a full disk or a kill cut short
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if selection is not None:
        write_scores(selection, out)


def _precision(cfg: Config) -> dict:
    """The resolved precisions, for ``summary.json``."""
    return {
        "teacher_dtype": cfg.teacher.dtype,
        "student_dtype": cfg.student.dtype,
        "mixed_precision": cfg.train.mixed_precision,
    }


def _params(student) -> int:
    """The student's parameters as exported: a PEFT student's adapters fold into its weights and add none, except
    that a tied head with an adapter is exported untied (one more matrix)."""
    return param_count(student) - adapter_count(student) + untied_head_count(student)


def _trained_part(student) -> str:
    """What of the student trains, when not all of it: ``student.peft``'s adapters, or what ``student.freeze``
    leaves (a tied tensor once)."""
    if has_adapters(student):
        return f", base frozen; {adapter_count(student) / 1e6:.3f}M adapter parameters trained"
    frozen = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters() if not p.requires_grad)
    return f", {frozen / 1e6:.2f}M of them frozen" if frozen else ""


def _eval_blocks(run: Run) -> int:
    """How many eval blocks ``run.evaluate`` scores."""
    t = run.cfg.train
    return min(run.eval_data["input_ids"].shape[0], t.batch_size * t.eval_batches)


def _say(accelerator: Accelerator):
    from rich.console import Console

    console = Console(stderr=True)

    def say(msg: str) -> None:
        if accelerator.is_main_process:
            console.print(msg)

    return say
