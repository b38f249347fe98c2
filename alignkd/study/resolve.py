"""What the ``${...}`` names of a study file stand for: packaged assets, prepare steps' models, or ``--quick``'s
stand-ins.

``${assets.NAME}``: a field of :class:`alignkd.assets.Assets` (teacher, sotu,
moby_dick, sentiment), looked up in the assets' cache (``$ALIGNKD_CACHE`` or
``~/.cache/alignkd``); an asset not prepared there stops the study before any
run, naming the ``alignkd assets`` command that prepares it. Under ``--quick``
the same names are the stand-ins. ``${prepare.NAME}``: ``OUT/prepare/NAME/student``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alignkd.assets import Assets, cache_dir
from alignkd.assets.store import complete, layout
from alignkd.checks import closest
from alignkd.errors import AssetError, ConfigError
from alignkd.study.merge import merge
from alignkd.study.standin import StandIns, shrink

ASSET_NAMES = tuple(f.name for f in dataclasses.fields(Assets))

QUICK = {
    "teacher": {"dtype": "float32", "cache": None, "placement": "replicate"},
    "data": {"seq_len": 32, "max_train_tokens": None, "token_cache": "off"},
    "generation": {"prompt_tokens": 8, "max_new_tokens": 8},  # prompts and continuations that fit the short blocks
    "train": {
        "batch_size": 4,
        "grad_accum": 1,
        "eval_batches": 2,
        "eval_every": 1,
        "warmup": 1,
        "mixed_precision": "no",
        "progress": False,
        "save_every": 0,
        "log_every": 1,
    },
}
"""What ``--quick`` sets in every run, whatever the study says: small blocks, prompts and batches, float32, an eval
every step."""


def packaged(cache: str | None = None) -> dict[str, Path]:
    """Every ``${assets.NAME}`` path in the cache (whether prepared is checked when a name is used)."""
    paths = layout(cache_dir(cache))
    return {name: getattr(paths, name) for name in ASSET_NAMES}


def stand_in(s: StandIns) -> dict[str, Path]:
    return {"teacher": s.teacher, "sotu": s.text_train, "moby_dick": s.text_heldout, "sentiment": s.sentiment}


class Names:
    """Resolves ``${...}`` names (called by :func:`alignkd.study.merge.substitute`)."""

    def __init__(self, out: Path, assets: dict[str, Path], *, check_prepared: bool, prepare: list[str]):
        self.out, self.assets, self.check_prepared, self.prepare = out, assets, check_prepared, prepare

    def __call__(self, name: str) -> str:
        space, _, key = name.partition(".")
        if space == "assets" and key in self.assets:
            path = self.assets[key]
            if self.check_prepared:
                _check_prepared(key, path)
            return str(path)
        if space == "prepare" and key in self.prepare:
            return str(product(self.out, key))
        known = [f"assets.{a}" for a in self.assets] + [f"prepare.{p}" for p in self.prepare]
        raise ConfigError(
            f"${{{name}}} is not a name a study knows; "
            f"use one of {', '.join('${' + k + '}' for k in known)}{closest(name, known)}"
        )


def product(out: Path, step: str) -> Path:
    """The model a prepare step makes."""
    return out / "prepare" / step / "student"


def _check_prepared(key: str, path: Path) -> None:
    root = cache_dir()
    asset = path.relative_to(root).parts[0]
    if complete(root / asset, asset, downloaded=False) is None:
        raise AssetError(
            f"${{assets.{key}}}: the packaged {asset} is not prepared in {root}; "
            f"run `alignkd assets --only {asset}` first (or use --quick)"
        )


def quick_config(cfg: dict, s: StandIns) -> dict:
    """A variant's (or prepare step's) raw config made to run on the stand-ins: teacher, data and widths replaced, see
    :data:`QUICK`."""
    teacher = cfg.get("teacher") or {}
    task = teacher.get("task", "causal_lm")
    student = cfg.get("student") or {}
    if student.get("path") is not None:
        raise ConfigError(
            f"student.path {student['path']}: --quick cannot stand in for a given student model; "
            "build it from the teacher (from_teacher or config)"
        )
    over: dict = {k: dict(v) for k, v in QUICK.items()}
    if "${prepare." not in str(teacher.get("path", "")):  # a prepare step's model is already a stand-in's
        over["teacher"]["path"] = "${assets.teacher}"
    if task == "sequence_classification":
        over["data"].update(train="${assets.sentiment}/train.csv", eval="${assets.sentiment}/dev.csv")
    else:
        over["data"].update(train="${assets.sotu}", eval="${assets.moby_dick}")
    if isinstance(student.get("config"), dict):
        over["student"] = {"config": shrink(student["config"], s.real, s.tiny)}
    if isinstance(student.get("from_teacher"), dict):
        ft = student["from_teacher"]
        # search: two candidate sets (importance and its span) keep the probes but skip the perplexity rule,
        # one teacher copy per block
        over["student"] = {
            "from_teacher": {
                "calibration_sequences": min(8, ft.get("calibration_sequences", 8)),
                "search_probe_steps": 2,
                "search_candidates": 2,
            }
        }
    return merge(cfg, over, "quick")
