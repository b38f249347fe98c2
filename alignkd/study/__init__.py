"""``alignkd study``: several recipes on one base config, each given the same training budget, compared in one table.

A study file (``configs/studies/*.yaml``) holds a base config, named variants
that override it, a budget (training minutes, by default, or steps) and how to
shrink it for ``--quick``. Each variant is a distillation run in
``OUT/<variant>/``; ``OUT/study.md``, ``study.html`` and ``study.json`` hold the
table and the held-out metric against training time, one curve per variant.

- :mod:`~alignkd.study.spec`: the study file's fields, checks and the budget.
- :mod:`~alignkd.study.merge`: how overrides merge; ``${...}`` names.
- :mod:`~alignkd.study.resolve`: what the names stand for; ``--quick``'s changes to each run.
- :mod:`~alignkd.study.standin`: ``--quick``'s tiny teacher, tokenizer and text.
- :mod:`~alignkd.study.runner`: running it; :mod:`~alignkd.study.marker`: what each run was made from.
- :mod:`~alignkd.study.results`, :mod:`~alignkd.study.write`: reading the runs, writing the outputs.
"""

from alignkd.study.runner import run_study
from alignkd.study.spec import Study, load_study

__all__ = ["Study", "load_study", "run_study"]
