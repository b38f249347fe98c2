"""The lm-eval-harness tasks alignkd ships: YAML files written at run time, pointing at the packaged data.

lm-eval reads a task from a YAML file in a folder its ``TaskManager`` indexes
(``include_path``). The packaged data lives in the assets cache, whose path
differs between machines, so the YAML is written into a scratch folder with the
resolved path just before the evaluation (:func:`write_task_files`), and the
task runs offline from the CSVs (``dataset_path: csv``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from alignkd.assets.sentiment import SENTIMENT_ROWS
from alignkd.evaluate.accuracy import TEMPLATE

SENTIMENT_CHOICES = sorted(SENTIMENT_ROWS)
"""The packaged sentiment data's labels; the index of the gold one is the target."""


def sentiment_task(folder: Path) -> dict:
    """``alignkd_sentiment``: the packaged sentiment test split as multiple choice, few-shot examples from train.

    The prompt is ``alignkd eval``'s own accuracy template (:data:`~alignkd.evaluate.accuracy.TEMPLATE`), so the two
    numbers measure the same thing through two implementations.
    """
    return {
        "task": "alignkd_sentiment",
        "dataset_path": "csv",
        "dataset_kwargs": {"data_files": {"train": str(folder / "train.csv"), "test": str(folder / "test.csv")}},
        "training_split": "train",
        "test_split": "test",
        "fewshot_split": "train",
        "output_type": "multiple_choice",
        "doc_to_text": TEMPLATE.replace("{text}", "{{text}}"),
        "doc_to_choice": SENTIMENT_CHOICES,
        "doc_to_target": "{{" + repr(SENTIMENT_CHOICES) + ".index(label)}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


PACKAGED_TASKS: dict[str, tuple[str, Callable[[Path], dict]]] = {
    "alignkd_sentiment": ("sentiment", sentiment_task),
}
"""Task name -> (the asset its data comes from, its YAML as a dict given that asset's folder)."""


def write_task_files(folder: Path, assets: dict[str, Path]) -> list[str]:
    """Write the YAML of every packaged task whose asset is in ``assets`` (name -> folder) into ``folder``.

    Returns the names written; a task whose asset is missing (or lacks one of its data files) is left out.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (asset, build) in PACKAGED_TASKS.items():
        if assets.get(asset) is None:
            continue
        task = build(Path(assets[asset]).resolve())
        if all(Path(f).is_file() for f in task["dataset_kwargs"]["data_files"].values()):
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
            written.append(name)
    return written
