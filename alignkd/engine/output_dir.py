"""The output folder of a run: what a run writes there, when a new run may use it, and what a resume may change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from alignkd.errors import ConfigError

TRACKER_IDS = "trackers.json"
"""The experiment trackers' run ids (``engine.trackers``): what ``--resume`` continues."""
# What a run writes into its output folder; --overwrite removes exactly these.
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "config.yaml",
    "block_scores.json",
    "projectors.safetensors",
    "eval.json",
    "report.html",
    "report.md",
    TRACKER_IDS,
)
RUN_DIRS = ("checkpoints", "student", "tensorboard", "wandb")
# What a write cut short leaves (a full disk, a kill): renamed into place only once whole, so never read.
LEFTOVERS = ("checkpoints/.step-*.tmp", ".student.tmp", ".projectors.safetensors.tmp")
# Settings a resumed run may change: they do not change what a step computes.
RESUMABLE = {
    "train.steps",
    "train.max_minutes",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.output_dir",
    "train.report_to",
    "train.project",
    "train.run_name",
    "data.token_cache",
}  # where tokens are cached, not which


def holds_run(out: Path) -> bool:
    return any((out / f).exists() for f in ("metrics.jsonl", "summary.json", "checkpoints", "student"))


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if not resume and not overwrite and holds_run(out):
        raise ConfigError(
            f"train.output_dir {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is a file; choose a folder")
    # The folder is made only once nothing can stop the run; find out now whether it can be.
    near = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not (near.is_dir() and os.access(near, os.W_OK | os.X_OK)):
        why = "is not writable" if near.is_dir() else "is a file"
        raise ConfigError(f"train.output_dir {out}: cannot write there ({near} {why}); choose a writable folder")


def clear(out: Path) -> None:
    remove_leftovers(out)
    for f in RUN_FILES:
        (out / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Remove the half-written temporary files and folders of an earlier write that did not finish."""
    for pattern in LEFTOVERS:
        for path in out.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v
    return flat


def check_resumable(saved: dict, now: dict, defaults: dict | None = None) -> None:
    """A resumed run must compute what the saved one did: only the ``RESUMABLE`` keys may change.

    ``defaults``: the config's default values; a key the saved config lacks (it was
    written before that setting existed) counts as its default.
    """
    a, b = {**_flat(defaults or {}), **_flat(saved)}, _flat(now)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE)
    if changed:
        shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed[:4]) + (
            " ..." if len(changed) > 4 else ""
        )
        raise ConfigError(
            f"--resume with a config that changes what the run computes: {shown}; "
            "restore those values, or start a new run with --overwrite or another train.output_dir"
        )
