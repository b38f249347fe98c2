"""A study file: a base config, named variants of it, a training budget, and how to run it small (``--quick``).

Read with :func:`load_study`; every field below is a key of the YAML file, and a
wrong key or value stops with one line naming it. A variant's config is
``base`` merged with its overrides (:mod:`alignkd.study.merge`), then the budget
and output folder the study sets (:func:`budgeted`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkd.checks import closest
from alignkd.config.load import from_dict
from alignkd.errors import ConfigError
from alignkd.study.merge import merge, names_in, touches

STEP_CAP = 1_000_000
"""``train.steps`` of a run budgeted in minutes: a cap that the minutes always reach first."""
STUDY_SETS = ("train.output_dir", "train.steps", "train.max_minutes")
"""Fields the study sets in every run (from ``budget`` and the study's folder): a variant may not."""
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class BudgetSpec:
    """What every variant gets: the same minutes of training (default) or the same optimizer steps."""

    minutes: float | None = None
    """Training minutes per variant (evaluations included, set-up and block selection not): a faster recipe gets more
    steps."""
    steps: int | None = None
    """Optimizer steps per variant instead of minutes."""


@dataclass
class VariantSpec:
    """One row of the study."""

    name: str = ""
    """Row name and folder name under the study's output folder (letters, digits, ``_ . -``)."""
    about: str = ""
    """One line on what the row tries, shown in the tables."""
    extends: str | None = None
    """An earlier variant whose overrides apply first (then this one's ``set``)."""
    set: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``base``: nested mappings or dotted keys; lists replace (see alignkd.study.merge)."""


@dataclass
class PrepareSpec:
    """A step run before the variants that need it, e.g. fine-tuning the teacher (teacher correction)."""

    name: str = ""
    """What variants write as ``${prepare.NAME}``: the model the step makes."""
    command: str = ""
    """What the step runs: finetune (``alignkd finetune`` of ``base`` with ``set``; makes OUT/prepare/NAME/student)."""
    about: str = ""
    """One line on what the step is for."""
    set: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``base`` for the step, including its own ``train.steps`` or ``train.max_minutes``."""


@dataclass
class QuickSpec:
    """``--quick``: the same variants on tiny random stand-ins of the teacher, a generated corpus, a few steps."""

    teacher: dict[str, Any] = field(default_factory=dict)
    """The teacher's shape (config.json keys: model_type, num_hidden_layers, num_attention_heads, num_key_value_heads,
    hidden_size, intermediate_size), used when its config.json is not on this machine."""
    steps: int = 4
    """Optimizer steps per variant (and per prepare step)."""


@dataclass
class TasksSpec:
    """lm-eval-harness tasks scored on each finished variant's student beside its teacher (``alignkd eval --tasks``)."""

    tasks: list[str] = field(default_factory=list)
    """Task names, e.g. [alignkd_sentiment]; empty: none (the table has the runs' own held-out metric only)."""
    num_fewshot: int | None = None
    """Few-shot examples in each task's prompts; None: each task's own default (the table states the count used)."""
    limit: int | None = None
    """Documents scored per task; None: all (``--quick``: at most 8)."""
    task_paths: list[str] = field(default_factory=list)
    """Folders of your own task YAML files."""


@dataclass
class StudySpec:
    """The study file."""

    title: str = ""
    """Heading of study.md and study.html (default: the file's name)."""
    about: str = ""
    """A paragraph on the question the study asks."""
    base: dict[str, Any] = field(default_factory=dict)
    """An alignkd distill config (as in configs/*.yaml) that every variant starts from."""
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    """The training budget of each variant: minutes (default 5) or steps."""
    reference: str | None = None
    """The variant the others are compared with (default: the first)."""
    variants: list[VariantSpec] = field(default_factory=list)
    """The rows, in order."""
    prepare: list[PrepareSpec] = field(default_factory=list)
    """Steps that make models the variants name as ``${prepare.NAME}``."""
    quick: QuickSpec = field(default_factory=QuickSpec)
    """How ``--quick`` shrinks the study."""
    eval: TasksSpec = field(default_factory=TasksSpec)
    """Benchmark tasks run on every variant's student and its teacher once the variant has trained."""


PREPARE_COMMANDS = ("finetune",)


@dataclass
class Study:
    """A checked study file, with each variant's overrides resolved through ``extends``."""

    path: Path
    """The study file."""
    spec: StudySpec
    """Its fields, checked; ``budget.minutes`` filled in when neither minutes nor steps is given."""
    overrides: dict[str, dict]
    """Variant name -> its effective overrides of ``base`` (``extends`` chain applied, in order)."""

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.spec.variants]

    @property
    def reference(self) -> str:
        return self.spec.reference or self.names[0]

    @property
    def title(self) -> str:
        return self.spec.title or self.path.stem

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.spec.variants if v.name == name)

    def step(self, name: str) -> PrepareSpec:
        return next(p for p in self.spec.prepare if p.name == name)

    def config(self, name: str) -> dict:
        """The variant's raw config dict (``${...}`` names still in it; no budget yet)."""
        return merge(self.spec.base, self.overrides[name], f"variants.{name}.set")

    def step_config(self, name: str) -> dict:
        return merge(self.spec.base, self.step(name).set, f"prepare.{name}.set")

    def steps_needed(self, names: list[str]) -> list[str]:
        """The prepare steps the variants ``names`` refer to, in the file's order."""
        used = set().union(*(names_in(self.config(n)) for n in names)) if names else set()
        return [p.name for p in self.spec.prepare if f"prepare.{p.name}" in used]


def load_study(path: str | Path) -> Study:
    """Read and check a study file; a problem is a one-line ``ConfigError`` naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return check(path, data)
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None


def check(path: Path, data: Any) -> Study:
    if not isinstance(data, dict):
        raise ConfigError("a study file is a mapping with base, variants and budget; see configs/studies/lm.yaml")
    spec = from_dict(StudySpec, data)
    if not spec.base:
        raise ConfigError("base: required: the alignkd distill config every variant starts from")
    if not spec.variants:
        raise ConfigError("variants: add at least one, e.g. [{name: kl, set: {losses: [{type: kl}]}}]")
    _check_budget(spec.budget)
    if spec.eval.num_fewshot is not None and spec.eval.num_fewshot < 0:
        raise ConfigError(f"eval.num_fewshot: {spec.eval.num_fewshot} must be >= 0")
    if spec.eval.limit is not None and spec.eval.limit < 1:
        raise ConfigError(f"eval.limit: {spec.eval.limit} must be >= 1")
    if spec.quick.steps < 1:
        raise ConfigError(f"quick.steps: {spec.quick.steps} must be >= 1")
    _check_names([p.name for p in spec.prepare], "prepare")
    for i, p in enumerate(spec.prepare):
        if p.command not in PREPARE_COMMANDS:
            raise ConfigError(
                f"prepare[{i}].command: '{p.command}' is not one of "
                f"{', '.join(PREPARE_COMMANDS)}{closest(p.command, list(PREPARE_COMMANDS))}"
            )
        for key in ("train.output_dir",):
            if touches(p.set, key):
                raise ConfigError(f"prepare[{i}].set: {key} is set by the study (OUT/prepare/{p.name}); remove it")
    _check_names([v.name for v in spec.variants], "variants")
    overrides: dict[str, dict] = {}
    for i, v in enumerate(spec.variants):
        where = f"variants[{i}] ({v.name})"
        for key in STUDY_SETS:
            if touches(v.set, key):
                raise ConfigError(f"{where}.set: {key} is set by the study (budget and OUT/{v.name}); remove it")
        if v.extends is not None and v.extends not in overrides:
            known = list(overrides)
            hint = closest(v.extends, known) if known else ""
            raise ConfigError(
                f"{where}.extends: '{v.extends}' is not an earlier variant "
                f"({', '.join(known) or 'none before it'}){hint}"
            )
        chain = merge(overrides[v.extends], v.set, f"{where}.set") if v.extends else dict(v.set)
        merge(spec.base, chain, f"{where}.set")  # a dotted key that cannot apply fails here, not mid-study
        overrides[v.name] = chain
        for name in sorted(names_in(chain) | names_in(spec.base)):
            if name.startswith("prepare.") and name[len("prepare.") :] not in {p.name for p in spec.prepare}:
                raise ConfigError(f"{where}: ${{{name}}} names no prepare step; add it under prepare: or fix the name")
    if spec.reference is not None and spec.reference not in overrides:
        raise ConfigError(f"reference: '{spec.reference}' is not a variant{closest(spec.reference, list(overrides))}")
    return Study(path, spec, overrides)


def _check_budget(b: BudgetSpec) -> None:
    if b.minutes is None and b.steps is None:
        b.minutes = 5.0
    if b.minutes is not None and b.steps is not None:
        raise ConfigError("budget: give minutes or steps, not both (equal minutes: a faster recipe gets more steps)")
    if b.minutes is not None and not b.minutes > 0:
        raise ConfigError(f"budget.minutes: {b.minutes:g} must be > 0")
    if b.steps is not None and b.steps < 1:
        raise ConfigError(f"budget.steps: {b.steps} must be >= 1")


def _check_names(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not SAFE_NAME.match(name or ""):
            raise ConfigError(
                f"{where}[{i}].name: {name!r} must be a folder name: letters, digits, _ . - (e.g. kl-search)"
            )
        if name in seen:
            raise ConfigError(f"{where}[{i}].name: '{name}' is used twice; names must be unique")
        seen.add(name)


def budgeted(cfg: dict, budget: BudgetSpec, output_dir: Path) -> dict:
    """``cfg`` with the study's budget and the run's folder in ``train`` (a copy)."""
    train = {"output_dir": str(output_dir)}
    if budget.minutes is not None:
        train.update(max_minutes=budget.minutes, steps=STEP_CAP)
    else:
        train.update(max_minutes=None, steps=budget.steps)
    return merge(cfg, {"train": train})
