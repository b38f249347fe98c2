"""Checkpoints: ``OUTPUT_DIR/checkpoints/step-N/`` with the student and projectors, optimizer, scheduler,
weighting, RNG states, data position and training time; and resuming from the latest one."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model


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


def save_checkpoint(run, step: int) -> Path:
    """Write ``step-N`` after ``step`` finished optimizer steps; keep the newest ``train.keep_checkpoints``."""
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


def load_checkpoint(run, path: Path) -> int:
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
