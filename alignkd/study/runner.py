"""Running a study: resolve every run's config, run the prepare steps and the variants, write the results.

The runs share this process (``engine.run.distill``, as the demo's two runs do):
a quick study then pays for importing torch and transformers once instead of
once per variant (seconds each on a small CPU), and each run already frees its
models when it returns; the process is garbage-collected between runs.

Each run folder gets ``study_run.json``: the study entries it was made from and
its wall time. A later ``--only`` run shows the other variants' finished runs
from it, as long as their entries in the study file are unchanged.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path

import torch

from alignkd.checks import closest
from alignkd.config import load_config
from alignkd.display import Stages
from alignkd.errors import ConfigError, UserError
from alignkd.study.marker import MARKER, fingerprint, read_marker
from alignkd.study.merge import merge, substitute
from alignkd.study.resolve import Names, packaged, product, quick_config, stand_in
from alignkd.study.spec import BudgetSpec, Study, budgeted
from alignkd.study.standin import StandIns, build, real_shape
from alignkd.study.tasks import check_tasks, score_variant


def selected(study: Study, only: list[str] | None) -> list[str]:
    if not only:
        return study.names
    for name in only:
        if name not in study.names:
            raise ConfigError(
                f"--only {name}: no such variant; the study has {', '.join(study.names)}{closest(name, study.names)}"
            )
    return [n for n in study.names if n in only]


def teacher_folder(study: Study) -> Path | None:
    """The folder of the study's teacher (a prepare step's source, for a prepared teacher), if it is on this machine."""
    path = str((study.spec.base.get("teacher") or {}).get("path", ""))
    for p in study.spec.prepare:
        if f"${{prepare.{p.name}}}" in path:
            path = str((study.step_config(p.name).get("teacher") or {}).get("path", ""))
    assets = packaged()

    def lenient(name: str) -> str:
        space, _, key = name.partition(".")
        if space != "assets" or key not in assets:
            raise KeyError(name)
        return str(assets[key])

    try:
        folder = Path(substitute(path, lenient)).expanduser()
    except KeyError:
        return None
    return folder if folder.is_dir() else None


class StudyPlan:
    """Every run of a study, resolved and checked before the first one starts."""

    def __init__(self, study: Study, out: Path, names: list[str], quick: bool, standins: StandIns | None):
        assets = stand_in(standins) if standins else packaged()
        self.assets = assets
        """What ``${assets.NAME}`` stands for in this study (the stand-ins under ``--quick``)."""
        resolve = Names(out, assets, check_prepared=not quick, prepare=[p.name for p in study.spec.prepare])
        quick_budget = BudgetSpec(steps=study.spec.quick.steps)
        self.steps: dict[str, dict] = {}
        for step in study.steps_needed(names):
            raw = study.step_config(step)
            raw = (
                budgeted(quick_config(raw, standins), quick_budget, out / "prepare" / step)
                if quick
                else _with_output(raw, out / "prepare" / step)
            )
            self.steps[step] = self._checked(substitute(raw, resolve), f"prepare step {step}")
        self.variants: dict[str, dict] = {}
        for name in names:
            raw = study.config(name)
            raw = quick_config(raw, standins) if quick else raw
            raw = budgeted(raw, quick_budget if quick else study.spec.budget, out / name)
            self.variants[name] = self._checked(substitute(raw, resolve), f"variant {name}")

    @staticmethod
    def _checked(cfg: dict, what: str) -> dict:
        try:
            load_config(data=copy.deepcopy(cfg))
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None
        return cfg


def _with_output(cfg: dict, folder: Path) -> dict:
    return merge(cfg, {"train": {"output_dir": str(folder)}})


def run_study(
    study: Study, out: str | Path, *, quick: bool = False, only: list[str] | None = None, stages: Stages | None = None
) -> dict:
    """Run the study's variants (``only``: just these) into ``out``; write study.md, study.html, study.json there.

    Returns what study.json holds. A variant that fails with bad input or
    diverges is recorded as failed and the others run; the outputs are written
    even when the study stops early (Ctrl-C), from the runs finished by then.
    """
    from alignkd.study.write import write_study

    out = Path(out)
    stages = stages or Stages()
    names = selected(study, only)
    standins = None
    if quick:
        with stages.stage("stand-ins", "quick: tiny stand-in teacher, generated text"):
            standins = build(out / "quick-assets", real_shape(teacher_folder(study), study.spec.quick.teacher))
    plan = StudyPlan(study, out, names, quick, standins)  # bad input stops here, before any run
    check_tasks(study.spec.eval, plan.assets)
    threads = torch.get_num_threads()
    if quick:  # the stand-ins' ops are too small to gain from threads, and lose much to them on a shared CPU
        torch.set_num_threads(1)
    try:
        for step, cfg in plan.steps.items():
            _prepare(study, step, cfg, out, quick, stages)
        for i, name in enumerate(names, 1):
            v = study.variant(name)
            with stages.stage(name, f"{i}/{len(names)} {name}" + (f": {v.about}" if v.about else "")):
                marker = _run(plan.variants[name], out / name, fingerprint(study, name, quick), "distill")
            if marker["error"]:
                stages.console.print(f"[red]{name} failed:[/] {marker['error']}")
            elif study.spec.eval.tasks:
                _score(study, name, plan, out, quick, stages)
    finally:
        torch.set_num_threads(threads)
        result = write_study(study, out, quick)
    return result


def _score(study: Study, name: str, plan: StudyPlan, out: Path, quick: bool, stages: Stages) -> None:
    """The study's lm-eval tasks on the variant's student beside its own teacher (:mod:`alignkd.study.tasks`)."""
    teacher = str(plan.variants[name]["teacher"]["path"])
    with stages.stage(f"{name}-tasks", f"{name}: lm-eval {', '.join(study.spec.eval.tasks)} (student and teacher)"):
        error = score_variant(study.spec.eval, out / name, teacher, quick, plan.assets)
    if error:
        stages.console.print(f"[red]{name} tasks failed:[/] {error}")


def _prepare(study: Study, step: str, cfg: dict, out: Path, quick: bool, stages: Stages) -> None:
    folder, mark = out / "prepare" / step, fingerprint(study, step, quick, step=True)
    old = read_marker(folder)
    if old and old["fingerprint"] == mark and not old["error"] and product(out, step).is_dir():
        stages.console.print(f"prepare {step}: reusing {product(out, step)} (its study entry is unchanged)")
        return
    p = study.step(step)
    with stages.stage(f"prepare-{step}", f"prepare {step}: {p.command}" + (f" ({p.about})" if p.about else "")):
        marker = _run(cfg, folder, mark, p.command)
    if marker["error"]:
        raise UserError(f"prepare step {step} failed: {marker['error']}")


def command(name: str):
    """The function a run calls: ``distill`` for a variant; a prepare step's ``command`` (spec.PREPARE_COMMANDS)."""
    if name == "finetune":
        from alignkd.engine.finetune import finetune

        return finetune
    if name == "distill":
        from alignkd.engine.run import distill

        return distill
    raise KeyError(name)


def _run(cfg: dict, run_dir: Path, mark: dict, what: str) -> dict:
    """One run in this process; returns the marker written into its folder."""
    (run_dir / MARKER).unlink(missing_ok=True)  # a run cut off midway must not look finished
    t0 = time.perf_counter()
    error = None
    try:
        command(what)(load_config(data=copy.deepcopy(cfg)), overwrite=True)
    except UserError as e:
        error = str(e)
    finally:
        gc.collect()  # the run's models go before the next run loads its own
    marker = {"fingerprint": mark, "wall_s": time.perf_counter() - t0, "error": error}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(json.dumps(marker, indent=2))
    return marker
