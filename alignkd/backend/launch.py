"""How this process was launched (one process, DDP, FSDP or DeepSpeed) and its Accelerator."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from alignkd.backend import zero
from alignkd.precision import default_device


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


FSDP_LAUNCH = "ACCELERATE_USE_FSDP"
"""Set by ``accelerate launch`` with an FSDP config: the run shards the student (``shard_student``)."""


def shards_student() -> bool:
    """Whether this process was launched to shard the student (an FSDP launch)."""
    return _flag(FSDP_LAUNCH)


def make_accelerator(mixed_precision: str, trackers: list[str] | None = None, logging_dir=None) -> Accelerator:
    """This process's Accelerator; on a machine without GPUs, the processes of a launch form a gloo group.

    ``trackers``: the experiment trackers (Accelerate's names) it reports to, their
    local files (TensorBoard's) under ``logging_dir``; ``engine.trackers`` starts them.

    ``accelerate launch --cpu`` starts one process whatever ``--num_processes``
    says (Accelerate runs several CPU processes only under ``mpirun``), and
    ``accelerate launch --multi_gpu`` / ``torchrun`` on a machine without GPUs
    start N processes that Accelerate, unless told to use the CPU, runs as N
    independent single-process runs (each writing its own outputs). Passing
    ``cpu=True`` where the run's device is the CPU makes them one gloo group.

    Under an FSDP or DeepSpeed launch the Accelerator is built as for DDP (its
    plugins would wrap the whole side, head included, or step the optimizer inside
    backward); the back-end (``backend.strategy``) does that work.
    """
    zero.launch_stage()  # a DeepSpeed launch alignkd cannot run stops here, in one line
    # Accelerate keeps its settings in a process-wide singleton, and a second run in the
    # same process (the demo's baseline, a study, a notebook) may ask for another precision.
    # Accelerate has no public reset; this private one keeps a launch's process group. It is
    # the only place alignkd touches Accelerate's private API.
    AcceleratorState._reset_state(reset_partial_state=False)
    if default_device().type == "cpu":
        # Where deepspeed is installed, transformers imports it to save a model: on the run's
        # device, even where a GPU is present but the run was told to use the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hidden = {k: os.environ.pop(k) for k in (FSDP_LAUNCH, zero.DEEPSPEED_LAUNCH) if k in os.environ}
    try:
        return Accelerator(
            mixed_precision=mixed_precision,
            cpu=default_device().type == "cpu",
            log_with=trackers or None,
            project_dir=None if logging_dir is None else str(logging_dir),
        )
    finally:
        os.environ.update(hidden)


def end_launch() -> None:
    """Leave this launch's process group, once a command has finished on this process.

    A process that exits with its gloo group still up can abort (SIGABRT,
    "terminate called without an active exception") as the interpreter tears down
    the group's worker threads, turning a finished run into a failed launch. Called
    only after success: on a failure the other processes may still be inside a
    collective, and leaving would hang them.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launched_processes() -> int:
    """How many processes this launch started (``WORLD_SIZE``, set by ``torchrun``/``accelerate launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def exit_launch(code: int) -> NoReturn:
    """End a process of a multi-process launch with ``code``, skipping the interpreter's teardown.

    Leaving the process group (``end_launch``) is not always enough: a finished
    run's process still aborted now and then (SIGABRT, "terminate called without
    an active exception") while the interpreter freed the native threads the
    distributed libraries left behind (gloo's, DeepSpeed's CPU communication),
    and the launcher then reported the whole run as failed. Every output is
    written and closed by the time a command returns, so the process flushes its
    streams and leaves at once.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            stream.flush()
    os._exit(code)
