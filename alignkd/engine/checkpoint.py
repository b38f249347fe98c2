"""Checkpoints: ``OUTPUT_DIR/checkpoints/step-N/``, written atomically, loaded without running pickled code.

A checkpoint folder holds ``side.safetensors`` (student and projectors),
``state.pt`` (optimizer, scheduler, weighting and the torch RNG: tensors and
plain containers only, read with ``weights_only=True``) and ``state.json``
(step, data position, training time, Python's RNG). A sharded student (an FSDP
launch) is saved as each process holds it, without gathering: ``side-rankR.safetensors``
and ``optimizer-rankR.pt`` per process, resumed by the same number of processes; under
a DeepSpeed launch the student is whole and each process writes its ZeRO optimizer
partition (``optimizer-rankR.pt``, with its float32 master weights, which under
ZeRO-3 are where the partitioned weights come back from). It is written under a
hidden temporary name and renamed into place, so a kill at any moment leaves
either the whole checkpoint or none; a write that fails (on any process) removes
the half-written folder, and one that runs out of room is one line naming the last
good checkpoint (``settle_writes``). At resume a checkpoint that fails to load
(on any process) is reported and the previous one is used, by every process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alignkd.disk import disk_errno, fix, folder_bytes, save_torch, tensor_bytes, why
from alignkd.engine.output_dir import remove_leftovers
from alignkd.errors import ConfigError, DiskError

if TYPE_CHECKING:
    from alignkd.engine.setup import Run


def _rng_tensors() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing an old one; a reader sees either, never a mix."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def save_checkpoint(run: Run, step: int) -> Path:
    """Write ``step-N`` after ``step`` finished optimizer steps; keep the newest ``train.keep_checkpoints``.

    A write that fails on any process fails on every one (see :func:`settle_writes`),
    leaving the checkpoints as they were; a full disk is one line naming the last good one.
    """
    acc = run.accelerator
    acc.wait_for_everyone()
    root = run.out / "checkpoints"
    path = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    # A failed write is kept until every process has passed the collectives it would have
    # skipped (the back-end's barriers), then all raise together.
    failed: Exception | None = None
    if acc.is_main_process:
        try:
            remove_leftovers(run.out)
            tmp.mkdir(parents=True)
        except OSError as e:
            failed = e
    extra: dict = {}
    try:
        extra = run.backend.save(run.side, run.optimizer, tmp)  # every process writes its part
    except Exception as e:
        failed = failed or e
    if acc.is_main_process and failed is None:
        try:
            _write_state(run, step, tmp, extra)
            replace_dir(tmp, path)
        except Exception as e:
            failed = e
    settle_writes(run, failed, [tmp], f"checkpoint {path.name}", root, lambda: _checkpoint_bytes(run))
    if acc.is_main_process:
        old = sorted(checkpoints(run.out), key=_step_of)
        for stale in old[: max(len(old) - run.cfg.train.keep_checkpoints, 0)]:
            shutil.rmtree(stale, ignore_errors=True)
    return path


def _write_state(run: Run, step: int, tmp: Path, extra: dict) -> None:
    """The main process's files of a checkpoint: ``state.pt`` and ``state.json``."""
    state = {
        "scheduler": run.scheduler.state_dict(),
        "weighting": run.weighting.state_dict(),
        "rng": _rng_tensors(),
        **extra,
    }
    save_torch(state, tmp / "state.pt")
    meta = {
        "step": step,
        "sampler": run.sampler.state_dict(),
        "sources": run.sources.state_dict(),
        "train_seconds": run.horizon.elapsed,
        "python_rng": _python_rng(),
    }
    if run.backend.layout is not None:
        meta[run.backend.layout] = run.accelerator.num_processes
    (tmp / "state.json").write_text(json.dumps(meta))


def _checkpoint_bytes(run: Run) -> int | None:
    """About what a checkpoint takes: the newest one's size, else the side's weights and AdamW's two moments."""
    last = latest_checkpoint(run.out)
    if last is not None:
        return folder_bytes(last)
    try:
        return 3 * tensor_bytes(run.unwrapped.state_dict().values())
    except Exception:  # sharded tensors may not say where their data is; the message does without
        return None


def settle_writes(
    run: Run,
    failed: Exception | None,
    tmps: list[Path],
    what: str,
    where: Path,
    needed,
    *,
    then: str = "continue from it with --resume",
) -> None:
    """After every process tried its part of a write (``failed``: its error, or None), all go on or all raise.

    A collective under a multi-process launch, in place of the barrier that ends the
    write. On failure the half-written ``tmps`` are removed. A full disk or quota, or a
    folder that cannot be written, is a one-line ``DiskError``: ``what`` could not be
    written to ``where``, the room it ``needed()`` (bytes, an estimate) and has, the last
    good checkpoint, and what to do ``then``. Any other error is raised as it was; a
    process whose own part was written raises that another one failed.
    """
    acc = run.accelerator
    need = needed() if failed is not None else None
    code = disk_errno(failed, where, need) if failed is not None else None
    worst = 0 if failed is None else 1 if code else 2  # 1: the disk's fault; 2: another error
    if acc.num_processes > 1:
        worst = max(worst, int(acc.reduce(torch.tensor(float(worst), device=acc.device), "max").item()))
    if not worst:
        return
    if acc.is_main_process:
        for tmp in tmps:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    last = latest_checkpoint(run.out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    if failed is None:
        message = f"another process could not write its part of {what} to {where} (see its error); {kept}"
        raise DiskError(message) if worst == 1 else RuntimeError(message)
    if code is None:
        raise failed
    then = then if last else "start the run again with --overwrite"
    raise DiskError(
        f"could not write {what} to {where}: {why(code, where, need)}; {kept}: {fix(code, where)}, then {then}", code
    ) from failed


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoint folders (temporary ones start with a dot and are never listed)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [p for p in root.glob("step-*") if p.name.split("-")[1].isdigit() and (p / "state.json").is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = checkpoints(out)
    return max(ckpts, key=_step_of) if ckpts else None


def load_checkpoint(run: Run, path: Path) -> int:
    """Restore a checkpoint into ``run``; returns the step to continue from. Raises on a damaged checkpoint."""
    meta = json.loads((path / "state.json").read_text())
    acc, backend = run.accelerator, run.backend
    was = next(((k, v) for k, v in meta.items() if k.endswith("_over")), None)
    now = (backend.layout, acc.num_processes) if backend.layout is not None else None
    if was != now:
        wrote = f"a run {backend.describe(was[0])} over {was[1]} processes" if was else f"a run {backend.describe('')}"
        raise ConfigError(f"--resume: {path} was written by {wrote}; resume it the same way")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    backend.load(run.side, run.optimizer, path, state)
    run.scheduler.load_state_dict(state["scheduler"])
    run.weighting.load_state_dict(state["weighting"])
    run.sampler.load_state_dict(meta["sampler"])
    run.sources.load_state_dict(meta.get("sources", {}))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    step = int(meta["step"])
    run.horizon.resume(step, float(meta["train_seconds"]))
    return step


def _loaded_everywhere(run: Run, ok: bool) -> bool:
    """Whether every process loaded the checkpoint (a collective under a multi-process launch)."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return ok
    return acc.reduce(torch.tensor(float(ok), device=acc.device), "sum").item() == acc.num_processes


def resume_latest(run: Run, say) -> int:
    """Load the newest checkpoint that loads; a damaged one is reported and skipped. Returns the step (0: none)."""
    for path in sorted(checkpoints(run.out), key=_step_of, reverse=True):
        error = None
        try:
            step = load_checkpoint(run, path)
        except ConfigError:  # a sound checkpoint of another launch: falling back would lose work
            raise
        except Exception as e:  # a truncated or corrupt file shows up as many error types
            error = e
        if not _loaded_everywhere(run, error is None):  # one process's bad file sends every process back
            e = error or RuntimeError("another process could not load its part")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(
                f"checkpoint {path} could not be loaded ({reason[:200]}); trying the one before", stacklevel=2
            )
            say(f"[yellow]checkpoint {path.name} is damaged ({type(e).__name__}); trying the one before[/]")
            continue
        say(f"resuming from {path} (step {step})")
        return step
    say(f"[yellow]--resume: no loadable checkpoint under {run.out / 'checkpoints'}; starting from step 0[/]")
    return 0
