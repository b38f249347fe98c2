"""Choosing a depth-pruned student's blocks inside a run: the teacher, calibration text and short distillation probes.

The measurements and rules are :mod:`alignkd.align.blocks`'s. This module gives
them the run's teacher and data, and for ``search`` scores each candidate with a
few optimizer steps of the run's own set-up and step. A run calls it before
its set-up (``engine.run.distill``); ``alignkd choose-blocks`` calls
``choose_blocks_only``.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from alignkd.align.blocks import Calibration, Selection, calibration_rows, choose, write_scores
from alignkd.align.tasks import TASKS
from alignkd.backend import make_accelerator
from alignkd.config import resolve_precision, resolved
from alignkd.engine.load import Inputs, load_inputs
from alignkd.engine.loop import next_batches
from alignkd.engine.setup import setup
from alignkd.engine.step import optimizer_step
from alignkd.errors import ConfigError
from alignkd.precision import default_device


def choosing(cfg) -> bool:
    """Whether a run must choose its student's blocks: from the teacher, a ``select`` other than even, no ``layers``
    yet."""
    ft = cfg.student.from_teacher
    return ft is not None and ft.layers is None and ft.select != "even"


def choose_blocks(
    cfg, accelerator: Accelerator, say=print, *, again: bool = False
) -> tuple[Selection | None, Inputs | None]:
    """Choose ``student.from_teacher.layers`` as its ``select`` says and write them into ``cfg`` (config.yaml then
    records them).

    Nothing happens unless :func:`choosing` (returns ``(None, None)``), or
    ``again`` (``alignkd choose-blocks``: blocks already listed are chosen anew).
    Returns the selection and the loaded inputs, which the run's set-up reuses.
    """
    ft = cfg.student.from_teacher
    if again and ft is None:
        raise ConfigError(
            "student.from_teacher: choosing blocks needs a student made from the teacher's blocks; "
            "set e.g. student.from_teacher.num_layers=6"
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
    probe = _probe(cfg, accelerator, inputs) if ft.select == "search" else None
    with _state_kept(accelerator):
        selection = choose(inputs.teacher.to(accelerator.device), calib, ft, probe)
    ft.layers = list(selection.layers)
    say(f"student blocks by {selection.rule} on {calib.sequences} calibration sequences: {selection.layers}")
    return selection, inputs


def _probe(cfg, accelerator: Accelerator, inputs: Inputs) -> Callable[[list[int]], float]:
    """``search``'s score of a candidate: the held-out loss after ``search_probe_steps`` steps of this run with those
    blocks."""
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
            run.teacher.close()  # its hooks sit on the shared teacher
            accelerator.free_memory()  # forget the probe's prepared model and optimizer

    return held_out_loss


@contextlib.contextmanager
def _state_kept(accelerator: Accelerator):
    """Random states and the loss scaler as they were before: the run after a selection starts as a rerun with its
    ``layers`` does."""
    py, npy = random.getstate(), np.random.get_state()
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        yield
    random.setstate(py)
    np.random.set_state(npy)
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)


def choose_blocks_only(cfg, say=print) -> tuple[Selection, Path]:
    """``alignkd choose-blocks``: choose the student's blocks as the config says (listed ``layers`` are chosen anew),
    and write ``block_scores.json``."""
    resolved(cfg)
    notes = [resolve_precision(cfg, default_device())]  # said once nothing can stop it: bad input gets one line
    accelerator = make_accelerator(cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    selection, _ = choose_blocks(cfg, accelerator, notes.append, again=True)
    for note in notes:
        say(note)
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    return selection, write_scores(selection, cfg.train.output_dir)
