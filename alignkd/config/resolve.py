"""Filling the values a config leaves to alignkd: ``~`` in paths, term names, ``auto`` precisions.

``resolve`` is what a built ``Config`` goes through before ``validate`` checks it;
``resolve_precision`` runs once the device is known. Both write the resolved
values into the config, so ``config.yaml`` records them and a rerun is exact.
"""

from __future__ import annotations

import os

import torch

from alignkd.precision import bf16_support, resolve_dtype, resolve_mixed_precision, resolve_student_dtype

_PATHS = (
    ("teacher", "path"),
    ("teacher", "cache"),
    ("student", "path"),
    ("data", "train"),
    ("data", "eval"),
    ("data", "augment_lm"),
    ("data", "unlabelled"),
    ("train", "output_dir"),
    ("generation", "prompts"),
    ("generation", "samples"),
)


def resolve(cfg) -> None:
    """Expand ``~`` in paths, name the unnamed loss terms and make ``train.report_to`` a list, in place. Idempotent."""
    # "key=~/x" on a command line reaches us unexpanded (the shell only expands a leading ~).
    for section, name in _PATHS:
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, name, os.path.expanduser(value))
    # An unnamed term takes its type as name, with a suffix when the name is taken.
    used = {t.name for t in cfg.losses if t.name is not None and not getattr(t, "_auto_name", False)}
    for loss in cfg.losses:
        if loss.name is None or getattr(loss, "_auto_name", False):
            name, k = str(loss.type), 1
            while name in used:
                k += 1
                name = f"{loss.type}_{k}"
            loss.name = name
            object.__setattr__(loss, "_auto_name", True)  # resolving again may rename it, never reject it
            used.add(name)
    # One tracker may be given as a name, and "none" means none: the list is what config.yaml records.
    report = cfg.train.report_to
    if isinstance(report, str):
        report = [report]
    if report == ["none"]:
        report = []
    cfg.train.report_to = report


def resolve_precision(cfg, device: torch.device) -> str:
    """Turn every ``auto`` precision of ``cfg`` into what is fast on ``device``, in place; returns the precision
    line."""
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


def resolved(cfg):
    """``cfg`` resolved, then validated: what a ``Config`` goes through when built, and again after a change."""
    from alignkd.config.validate import validate

    resolve(cfg)
    validate(cfg)
    return cfg
