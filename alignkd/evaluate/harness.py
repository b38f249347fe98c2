"""Benchmark tasks through lm-eval-harness, on the models ``alignkd eval`` has already loaded.

:func:`open_harness` imports lm-eval, writes alignkd's packaged task files into a
scratch folder (:mod:`.task_files`), indexes them with lm-eval's own tasks and the
user's ``--task-path`` folders, and checks every task name, all before the first
model loads. :meth:`Harness.run` hands one loaded model and its tokenizer to
lm-eval (``HFLM`` wraps the instance; nothing is loaded twice) and returns, per
task, the score and what fixes its meaning: the shots actually used, the task's
version, its prompt template and a hash of its whole config, and the limit.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alignkd.display import DEBUG, hf_bars_hidden
from alignkd.errors import EvalError
from alignkd.evaluate.task_files import PACKAGED_TASKS, write_task_files

INSTALL = "pip install 'alignkd[eval]'"
TASK_BATCH = 8
"""Requests per forward pass in lm-eval (it sorts them by length, so padding stays small)."""
TEMPLATE_KEYS = (
    "output_type",
    "description",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "target_delimiter",
    "fewshot_delimiter",
)
"""The fields of a task's config that make up its prompt, recorded as they were run."""


def lm_eval_module():
    """``lm_eval``, or a one-line :class:`EvalError` saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (the model wrapper comes with the extra's deps)
    except ImportError:
        raise EvalError(f"--tasks runs lm-eval-harness, which is not installed; {INSTALL}") from None
    return lm_eval


@dataclass
class Harness:
    """lm-eval's task index and the checked task settings; :meth:`run` scores one model."""

    manager: object
    """lm-eval's ``TaskManager``: its own tasks, alignkd's packaged ones and the ``--task-path`` folders."""
    tasks: list[str]
    num_fewshot: int | None
    """Shots for every task; None: each task's own default."""
    limit: int | None
    """Documents scored per task; None: all of them."""
    seed: int = 0
    """Seed of lm-eval's few-shot draw (the same examples for every model)."""

    def run(self, model, tokenizer) -> dict:
        """``{task: score record}`` for one loaded causal LM (see :func:`records`)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=TASK_BATCH, softmax_dtype="float32")
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(self.tasks),
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                task_manager=self.manager,
                bootstrap_iters=1000,
                log_samples=True,  # each document's choices give its chance level
                random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        return records(out, self.limit)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's log lines and progress bars off the screen (ours is on it), unless ``alignkd --debug``."""
    if os.environ.get(DEBUG):
        yield
        return
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with hf_bars_hidden(), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def open_harness(
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    paths: list[str] = (),
    assets: dict[str, Path] | None = None,
    seed: int = 0,
) -> Iterator[Harness]:
    """A :class:`Harness` for ``tasks`` once lm-eval is there, every path exists and every name is known.

    ``assets`` (name -> folder) feeds the packaged tasks; None: the assets cache.
    The packaged tasks' YAML files live in a scratch folder for the block's duration.
    """
    for p in paths:
        if not Path(p).is_dir():
            raise EvalError(f"--task-path {p} is not a folder; give the folder that holds your task YAML files")
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="alignkd-tasks-") as scratch:
        written = write_task_files(Path(scratch), _packaged_assets() if assets is None else assets)
        with _quiet():
            manager = TaskManager(include_path=[scratch, *map(str, paths)])
        check_names(tasks, manager.all_tasks, written)
        _check_data(tasks, manager)
        yield Harness(manager, list(tasks), num_fewshot, limit, seed)


def _check_data(tasks: list[str], manager) -> None:
    """Load the tasks' data once, so that data lm-eval cannot reach (a hub dataset offline) stops the evaluation
    before the first model loads, in one line; the runs then read it from the datasets cache."""
    try:
        with _quiet():
            manager.load(list(tasks))
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvalError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({first}); a hub dataset needs the network or "
            "its cached copy, a local one the files its YAML names"
        ) from None


def _packaged_assets() -> dict[str, Path]:
    from alignkd.assets import cache_dir
    from alignkd.assets.store import layout

    return {"sentiment": layout(Path(cache_dir())).sentiment}


def check_names(tasks: list[str], known: list[str], written: list[str]) -> None:
    """One line for the first unknown task name, with the known names closest to it."""
    for name in tasks:
        if name in known:
            continue
        if name in PACKAGED_TASKS and name not in written:
            asset = PACKAGED_TASKS[name][0]
            raise EvalError(
                f"task {name} reads the packaged {asset} data, which is not prepared; "
                f"run `alignkd assets --only {asset}`"
            )
        near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; close names: {', '.join(near)}" if near else ""
        raise EvalError(
            f"unknown lm-eval task {name!r}{hint}; give a task lm-eval knows (`lm-eval ls tasks`), or the folder "
            "of your task's YAML with --task-path"
        )


def records(out: dict, limit: int | None) -> dict:
    """Per task in lm-eval's result ``out``: the headline metric, its stderr, and what the number depends on."""
    found = {}
    for name, scores in out["results"].items():
        config = out.get("configs", {}).get(name)
        metric, key = _headline(scores, config)
        if key is None:
            continue  # a group without an aggregate score of its own
        stderr = scores.get(key.replace(",", "_stderr,", 1))
        samples = out.get("samples", {}).get(name) or []
        found[name] = {
            "metric": metric,
            "value": scores[key],
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "higher_is_better": out.get("higher_is_better", {}).get(name, {}).get(metric, True),
            "shots": out.get("n-shot", {}).get(name),
            "version": out.get("versions", {}).get(name),
            "limit": limit,
            "docs": (out.get("n-samples", {}).get(name) or {}).get("effective", len(samples) or None),
            "chance": _chance(config, samples, metric),
            "template": {k: _plain(config[k]) for k in TEMPLATE_KEYS if config and k in config},
            "config_sha256": _digest(config) if config else None,
            "metrics": {k: v for k, v in scores.items() if "," in k and isinstance(v, (int, float))},
        }
    return found


def _headline(scores: dict, config: dict | None) -> tuple[str, str | None]:
    """The task's first listed metric (``acc`` before ``acc_norm``) and its key in lm-eval's results."""
    keys = [k for k in scores if "," in k and "_stderr," not in k and isinstance(scores[k], (int, float))]
    wanted = [m.get("metric") for m in (config or {}).get("metric_list") or [] if isinstance(m, dict)]
    for metric in wanted:
        for k in keys:
            if k.split(",", 1)[0] == metric:
                return metric, k
    return (keys[0].split(",", 1)[0], keys[0]) if keys else ("", None)


def _chance(config: dict | None, samples: list[dict], metric: str) -> float | None:
    """The expected accuracy of a uniform guess over each scored document's choices; None unless multiple choice."""
    if not config or config.get("output_type") != "multiple_choice" or not metric.startswith("acc"):
        return None
    counts = [len(s["arguments"]) for s in samples if s.get("arguments")]
    return statistics.fmean(1 / n for n in counts) if counts else None


def _plain(v):
    """A config value as JSON holds it (a Python task's functions by name)."""
    if isinstance(v, (str, int, float, bool, type(None), list, dict)):
        return v
    return getattr(v, "__name__", str(v))


def _digest(config: dict) -> str:
    """SHA-256 of the task's config, less where its data file lies on this machine: equal hashes, the same task."""
    kept = {k: v for k, v in config.items() if k not in ("dataset_kwargs", "metadata")}
    kept["version"] = (config.get("metadata") or {}).get("version")
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=_plain).encode()).hexdigest()
