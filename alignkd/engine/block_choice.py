"""Choosing a depth-pruned student's blocks inside a run: the teacher, calibration text and short distillation probes.

The measurements and rules are :mod:`alignkd.align.blocks`'s. This module gives
them the run's teacher and data, and for ``search`` scores each candidate with a
few optimizer steps of the run's own set-up and step. That set-up is passed in
(``setup``): ``engine.run`` calls this module before it builds the student, so
this module cannot import it back.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from alignkd.align.blocks import Calibration, Selection, calibration_rows, choose
from alignkd.align.tasks import TASKS
from alignkd.engine.loop import next_batches
from alignkd.engine.step import optimizer_step
from alignkd.errors import ConfigError
from alignkd.models import load_model, load_tokenizer
from alignkd.models.loading import check_positions
from alignkd.models.student import freeze


@dataclass
class Inputs:
    """Tokenizer, teacher and data, loaded once for the selection and reused by the run that follows it."""

    tokenizer: object
    teacher: nn.Module
    """Frozen, with its weights (a run that reads a teacher cache empties it after building the student)."""
    train_data: dict[str, torch.Tensor]
    eval_data: dict[str, torch.Tensor]


def choosing(cfg) -> bool:
    """Whether a run must choose its student's blocks: from the teacher, a ``select`` other than even, no ``layers`` yet."""
    ft = cfg.student.from_teacher
    return ft is not None and ft.layers is None and ft.select != "even"


def load_inputs(cfg) -> Inputs:
    t = cfg.teacher
    tok = load_tokenizer(t.path, what="teacher", trust_remote_code=t.trust_remote_code)
    teacher = freeze(
        load_model(t.path, task=t.task, dtype=t.dtype, what="teacher", trust_remote_code=t.trust_remote_code)
    )
    check_positions(teacher, cfg.data.seq_len, "teacher")
    train_data, eval_data = TASKS[t.task].load_data(cfg, tok)  # resolves data.bos in cfg, as the run would
    return Inputs(tok, teacher, train_data, eval_data)


def choose_blocks(
    cfg, accelerator: Accelerator, setup: Callable, say=print, *, again: bool = False
) -> tuple[Selection | None, Inputs | None]:
    """Choose ``student.from_teacher.layers`` as its ``select`` says and write them into ``cfg`` (config.yaml then records them).

    Nothing happens unless :func:`choosing` (returns ``(None, None)``), or
    ``again`` (``alignkd prune``: blocks already listed are chosen anew). Returns
    the selection and the loaded inputs, which the run reuses. ``setup`` is
    ``engine.run.setup``, for ``search``'s probes.
    """
    ft = cfg.student.from_teacher
    if again and ft is None:
        raise ConfigError(
            "student.from_teacher: choosing blocks needs a student made from the teacher's blocks; set e.g. student.from_teacher.num_layers=6"
        )
    if not (again or choosing(cfg)):
        return None, None
    inputs = load_inputs(cfg)
    calib = Calibration(
        calibration_rows(inputs.train_data, ft.calibration_sequences, cfg.train.seed),
        TASKS[cfg.teacher.task],
        inputs.tokenizer,
        skip_bos=cfg.data.bos == "always",
        batch_size=cfg.train.batch_size,
        device=accelerator.device,
        autocast=accelerator.autocast,
    )
    probe = _probe(cfg, accelerator, inputs, setup) if ft.select == "search" else None
    with _state_kept(accelerator):
        selection = choose(inputs.teacher.to(accelerator.device), calib, ft, probe)
    ft.layers = list(selection.layers)
    say(f"student blocks by {selection.rule} on {calib.sequences} calibration sequences: {selection.layers}")
    return selection, inputs


def _probe(cfg, accelerator: Accelerator, inputs: Inputs, setup: Callable) -> Callable[[list[int]], float]:
    """``search``'s score of a candidate: the held-out loss after ``search_probe_steps`` steps of this run with those blocks."""
    steps = cfg.student.from_teacher.search_probe_steps

    def held_out_loss(layers: list[int]) -> float:
        trial = copy.deepcopy(cfg)
        trial.student.from_teacher.layers = list(layers)
        trial.teacher.cache = None  # the live teacher is loaded anyway
        trial.teacher.placement = "replicate"  # sharding wraps the teacher: once, for the run itself
        t = trial.train
        t.steps, t.max_minutes, t.warmup = steps, None, min(t.warmup, steps // 4)
        set_seed(cfg.train.seed)  # every candidate starts from the same draws
        run = setup(trial, accelerator, say=lambda _: None, inputs=inputs)
        try:
            for step in range(steps):
                optimizer_step(run, step, next_batches(run, step))
            return run.evaluate(run.unwrapped.student)["eval_loss"]
        finally:
            run.teacher_capture.remove()  # its hooks sit on the shared teacher
            accelerator.free_memory()  # forget the probe's prepared model and optimizer

    return held_out_loss


@contextlib.contextmanager
def _state_kept(accelerator: Accelerator):
    """Random states and the loss scaler as they were before: the run after a selection starts as a rerun with its ``layers`` does."""
    py, npy = random.getstate(), np.random.get_state()
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        yield
    random.setstate(py)
    np.random.set_state(npy)
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
