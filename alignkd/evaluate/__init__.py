"""Evaluation of a student beside its teacher and baselines.

- :mod:`~alignkd.evaluate.settings`: what is measured and on how much data.
- :mod:`~alignkd.evaluate.catalogue`: the one list of metrics (labels, formats,
  which way is better, retention), shared with the report and the demo.
- :mod:`~alignkd.evaluate.perplexity`, :mod:`~alignkd.evaluate.accuracy`,
  :mod:`~alignkd.evaluate.generation`, :mod:`~alignkd.evaluate.cost`: the metrics,
  each a function of one model that returns plain numbers.
- :mod:`~alignkd.evaluate.inputs`, :mod:`~alignkd.evaluate.loading`: data and models in.
- :mod:`~alignkd.evaluate.runner`: :func:`evaluate_models`, one model in memory at a time.
- :mod:`~alignkd.evaluate.table`: the table ``alignkd eval`` prints.
- :mod:`~alignkd.evaluate.harness`, :mod:`~alignkd.evaluate.task_files`,
  :mod:`~alignkd.evaluate.task_results`: benchmark tasks through lm-eval-harness
  (``--tasks``) on the loaded models, alignkd's packaged task files, and their
  records and retention in ``eval.json``.
"""

from alignkd.errors import EvalError
from alignkd.evaluate.accuracy import TEMPLATE, demo_prefix, label_accuracy, label_scores, split_shots
from alignkd.evaluate.catalogue import KEPT, METRICS, Kept, Metric, retention
from alignkd.evaluate.cost import latency, param_counts, size_on_disk
from alignkd.evaluate.generation import PROMPT_TOKENS, continuations, generation_metrics, passages
from alignkd.evaluate.inputs import read_held_out, read_labelled, token_stream
from alignkd.evaluate.loading import is_classifier, load
from alignkd.evaluate.perplexity import perplexity
from alignkd.evaluate.runner import evaluate_models
from alignkd.evaluate.settings import GROUPS, EvalSettings, check_settings
from alignkd.evaluate.table import eval_tables, print_table

__all__ = [
    "GROUPS",
    "KEPT",
    "METRICS",
    "PROMPT_TOKENS",
    "TEMPLATE",
    "EvalError",
    "EvalSettings",
    "Kept",
    "Metric",
    "check_settings",
    "continuations",
    "demo_prefix",
    "eval_tables",
    "evaluate_models",
    "generation_metrics",
    "is_classifier",
    "label_accuracy",
    "label_scores",
    "latency",
    "load",
    "param_counts",
    "passages",
    "perplexity",
    "print_table",
    "read_held_out",
    "read_labelled",
    "retention",
    "size_on_disk",
    "split_shots",
    "token_stream",
]
