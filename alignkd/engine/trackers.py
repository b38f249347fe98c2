"""Experiment trackers (``train.report_to``) through Accelerate, on the main process only.

Which trackers a run uses is decided before anything is written (``chosen``): one
the config names but that is not installed stops the run in one line. They start
once the output folder is ready (``tracking``), get the resolved config and the
precision line, then every ``metrics.jsonl`` record's numbers (``numbers``). The
wandb and MLflow run ids are kept in ``OUTPUT_DIR/trackers.json``, so ``--resume``
continues the same runs.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress
from pathlib import Path

from accelerate.tracking import get_available_trackers

from alignkd.config import Config, to_dict
from alignkd.engine.output_dir import TRACKER_IDS
from alignkd.errors import ConfigError


def chosen(cfg: Config) -> list[str]:
    """The trackers this run reports to (Accelerate's names).

    ``train.report_to: null`` is TensorBoard where it is installed, as before there
    was a choice; a tracker named in ``report_to`` must be installed.
    """
    installed = {str(t) for t in get_available_trackers()}
    if cfg.train.report_to is None:
        return ["tensorboard"] if "tensorboard" in installed else []
    for name in cfg.train.report_to:
        if name not in installed:
            raise ConfigError(
                f"train.report_to: {name} is not installed; pip install {name}, or remove it from train.report_to"
            )
    return list(dict.fromkeys(cfg.train.report_to))  # a name given twice starts one tracker


def flat_config(cfg: Config, precision: str) -> dict:
    """The config as ``config.yaml`` records it, one dotted key per value (``train.lr``, ``losses.0.type``), and the
    precision line; values are numbers, booleans and strings (lists and null in their JSON text), which every tracker
    stores."""
    out = {"precision": precision}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)

    walk(to_dict(cfg), "")
    return out


def numbers(record: dict) -> dict:
    """A ``metrics.jsonl`` record as tracker values: its numbers under ``<split>/<key>``, a ``/`` in the key written
    ``.`` (``train/loss``, ``train/loss.kl``): MLflow's file store keeps a metric in a file at its name's path, so
    ``loss`` could not hold ``loss/kl``."""
    return {
        f"{record['split']}/{k.replace('/', '.')}": v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@contextmanager
def tracking(acc, cfg: Config, precision: str, resume: bool):
    """The trackers of ``acc`` (made with ``chosen``'s names) from start to finish around the loop.

    A tracker that cannot start (a wrong tracking URI, no login) is one line. On
    the other processes this does nothing.
    """
    if not acc.log_with or not acc.is_main_process:
        yield
        return
    out = Path(cfg.train.output_dir)
    ids = _read_ids(out) if resume else {}
    try:
        acc.init_trackers(cfg.train.project, init_kwargs=_init_kwargs(cfg, out, ids))
        config = flat_config(cfg, precision)
        for tracker in acc.trackers:
            tracker.store_init_configuration(_unlogged(tracker, config))
    except Exception as e:
        name = _starting(acc)
        _finish(acc, failed=True)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"train.report_to: {name} did not start ({type(e).__name__}: {first}); "
            f"fix its settings or remove it from train.report_to"
        ) from None
    (out / TRACKER_IDS).write_text(json.dumps({**ids, **_run_ids(acc)}, indent=2))
    try:
        yield
    except BaseException:  # an error, Ctrl-C or SIGTERM: the runs say so, and --resume reopens them
        _finish(acc, failed=True)
        raise
    _finish(acc)


def _init_kwargs(cfg: Config, out: Path, ids: dict) -> dict:
    """Each tracker's start arguments: the run name, wandb's files in the output folder unless ``WANDB_DIR`` says
    where, and the run to continue."""
    name = cfg.train.run_name or out.resolve().name
    wandb: dict = {"name": name}
    if "WANDB_DIR" not in os.environ:
        wandb["dir"] = str(out)
    if ids.get("wandb"):
        wandb.update(id=ids["wandb"], resume="allow")
    mlflow: dict = {"run_name": name}
    if ids.get("mlflow"):
        mlflow["run_id"] = ids["mlflow"]
    return {"wandb": wandb, "mlflow": mlflow}


def _unlogged(tracker, config: dict) -> dict:
    """What ``tracker`` still takes of ``config``: an MLflow parameter is written once, so a resumed run keeps the
    first value of a setting the resume changed (``train.steps``; ``config.yaml`` has the new one)."""
    if tracker.name != "mlflow":
        return config
    logged = tracker.tracker.data.params
    return {k: v for k, v in config.items() if k not in logged}


def _run_ids(acc) -> dict:
    """The ids of the runs a resume can continue."""
    ids = {}
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.tracker.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.tracker.info.run_id
    return ids


def _read_ids(out: Path) -> dict:
    try:
        ids = json.loads((out / TRACKER_IDS).read_text())
    except (OSError, ValueError):  # none yet (the run had no trackers), or cut short: new runs
        return {}
    return ids if isinstance(ids, dict) else {}


def _starting(acc) -> str:
    """The tracker that failed: the first that is not running yet (they start in order)."""
    for tracker in acc.trackers:
        if getattr(tracker, "tracker", None) is None:
            return tracker.name
    return ", ".join(t.name for t in acc.trackers) or ", ".join(map(str, acc.log_with))


def _finish(acc, failed: bool = False) -> None:
    """Close every tracker that started (wandb with exit code 1 and MLflow as FAILED when the run ``failed``); one
    that cannot close must not hide why the run stopped."""
    for tracker in acc.trackers:
        with suppress(Exception):
            if failed and tracker.name == "wandb":
                tracker.tracker.finish(exit_code=1)
            elif failed and tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            else:
                tracker.finish()
    acc.trackers.clear()
