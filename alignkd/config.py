"""The distillation config: typed dataclasses, YAML loading, dotted overrides, validation.

Each field carries a docstring (the string right below it); ``field_docs`` reads
them, and a test checks that none is missing. Errors are ``ConfigError`` with one
line that names the field and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A bad config value or key; the message says which field and how to fix it."""


@dataclass
class ModelConfig:
    """The teacher model."""

    path: str = ""
    """Local directory or hub id of a Hugging Face model."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 where it is fast: CUDA with bf16, CPUs with AVX512-BF16/AMX; else float32), float32, bfloat16 or float16."""
    task: str = "causal_lm"
    """Model head: causal_lm, sequence_classification or masked_lm."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub repository."""


@dataclass
class FromTeacherConfig:
    """A student made by copying some of the teacher's blocks (depth pruning)."""

    layers: list[int] | None = None
    """Teacher block indices to keep, in order; None picks ``num_layers`` evenly spread blocks."""
    num_layers: int | None = None
    """How many blocks to keep when ``layers`` is None (default: a quarter of the teacher's, at least 1)."""


@dataclass
class StudentConfig:
    """The student: exactly one of ``path``, ``from_teacher`` or ``config``."""

    path: str | None = None
    """Local directory or hub id of a Hugging Face model to train as the student."""
    from_teacher: FromTeacherConfig | None = None
    """Copy embeddings, chosen blocks, final norm and head from the teacher."""
    config: dict[str, Any] | None = None
    """Overrides of the teacher's config (e.g. num_hidden_layers, hidden_size) for a new student of its architecture."""
    init: str = "random"
    """For a ``config`` student: random (fresh weights) or prune (width-pruned copy of the teacher by weight importance)."""
    dtype: str = "auto"
    """Student weights dtype while training: auto (float32, the optimizer's master weights; bf16 compute comes from train.mixed_precision), float32, bfloat16 or float16."""


@dataclass
class DataConfig:
    """Training and evaluation text."""

    train: str = ""
    """Text file, folder, JSONL, CSV, ``load_from_disk`` folder or ``datasets`` name."""
    eval: str | None = None
    """Held-out set in any of the same forms; None splits ``eval_fraction`` off the training blocks."""
    seq_len: int = 256
    """Tokens per packed training block."""
    text_field: str = "text"
    """JSONL field / CSV column holding the text."""
    label_field: str = "label"
    """JSONL field / CSV column holding the class label (classification models)."""
    eval_fraction: float = 0.05
    """Share of the training blocks held out when no eval set is named."""
    max_train_tokens: int | None = None
    """Cap on training tokens read (None reads everything)."""
    bos: str = "auto"
    """BOS at the head of every packed causal-LM block: auto (when the tokenizer adds one itself, as Llama's and Gemma's do), always or never; a run records what auto chose."""


@dataclass
class ScheduleConfig:
    """How a loss term's weight multiplier or temperature changes over training."""

    kind: str = "constant"
    """constant (``start``), warmup (0 to ``start`` over ``steps``, then ``start``), linear or cosine (``start`` to ``end`` over ``steps``)."""
    start: float = 1.0
    """Value at step 0 (for ``warmup``: the value after the warm-up)."""
    end: float = 1.0
    """Value after ``steps`` steps (linear and cosine)."""
    steps: int | None = None
    """Length of the ramp in optimizer steps; None means the whole run."""


@dataclass
class LossConfig:
    """One loss term. Which fields apply depends on ``type`` (see ``LOSS_FIELDS``)."""

    type: str = ""
    """ce, kl, dkd, hidden, attention, relation, contrastive or blockwise."""
    weight: float = 1.0
    """Static weight (the initial weight under gradnorm / uncertainty)."""
    name: str | None = None
    """Label in logs and metrics; defaults to the type (with a suffix when a type repeats)."""
    kind: str = "forward"
    """kl / blockwise: forward, reverse, jsd, skew_forward, skew_reverse or tvd."""
    temperature: float | None = None
    """Softening temperature (defaults: kl 1.0, blockwise 1.0, dkd 4.0, relation 1.0, contrastive 0.1)."""
    beta: float | None = None
    """kl jsd mixture weight (default 0.5); dkd weight of the non-target term (default 8.0)."""
    alpha: float | None = None
    """kl skew (default 0.1); dkd weight of the target term (default 1.0)."""
    metric: str = "mse"
    """hidden: mse, cosine or standardized."""
    layers: Any = "auto"
    """Layer map: auto, last, source (a from_teacher student's blocks meet the blocks they were copied from), adaptive, or explicit [[student, teacher], ...] pairs."""
    of: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    """relation: which projections to relate (q, k, v)."""
    num_relation_heads: int | None = None
    """relation: heads to split q/k/v into (default: the student's attention heads)."""
    symmetric: bool = False
    """contrastive: also classify teacher rows among student features."""
    max_tokens: int | None = 4096
    """contrastive: sample at most this many positions per step (bounds the N x N scores)."""
    projector: str = "linear"
    """When widths differ: linear, or linear_norm (linear then layer norm)."""
    weight_schedule: ScheduleConfig | None = None
    """Multiplier on the weight over training (None: constant 1)."""
    temperature_schedule: ScheduleConfig | None = None
    """Temperature over training (None: constant ``temperature``)."""


COMMON_LOSS_FIELDS = {"type", "weight", "name", "weight_schedule"}
LOSS_FIELDS: dict[str, set[str]] = {
    "ce": set(),
    "kl": {"kind", "temperature", "beta", "alpha", "temperature_schedule"},
    "dkd": {"temperature", "beta", "alpha", "temperature_schedule"},
    "hidden": {"metric", "layers", "projector"},
    "attention": {"layers"},
    "relation": {"of", "layers", "num_relation_heads", "temperature", "temperature_schedule"},
    "contrastive": {"layers", "temperature", "symmetric", "max_tokens", "projector", "temperature_schedule"},
    "blockwise": {"layers", "kind", "temperature", "beta", "alpha", "projector", "temperature_schedule"},
}
"""Fields each loss type accepts besides the common ones."""

DEFAULT_TEMPERATURE = {"kl": 1.0, "blockwise": 1.0, "dkd": 4.0, "relation": 1.0, "contrastive": 0.1}
DEFAULT_LAYERS = {"hidden": "auto", "attention": "last", "relation": "last", "contrastive": "last", "blockwise": "auto"}


@dataclass
class WeightingConfig:
    """How the loss terms are combined."""

    strategy: str = "static"
    """static (fixed weights), gradnorm (Chen et al. 2018) or uncertainty (Kendall et al. 2018)."""
    alpha: float = 1.5
    """gradnorm: asymmetry; larger pulls harder on terms that train slowly."""
    lr: float = 0.025
    """gradnorm: learning rate of the weights."""
    every: int = 1
    """gradnorm: update the weights every this many optimizer steps (each update costs one backward per term)."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 300
    """Optimizer steps (the most, when ``max_minutes`` is set)."""
    max_minutes: float | None = None
    """Stop after this many minutes of training, evaluations included (None: run all ``steps``); the schedules then end at the projected last step."""
    batch_size: int = 8
    """Blocks per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate of AdamW (student and projectors)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms, biases and weighting parameters)."""
    warmup: int = 30
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    mixed_precision: str = "auto"
    """auto (bf16 autocast where bf16 is fast: CUDA with bf16, CPUs with AVX512-BF16/AMX; else none), no, bf16 or fp16."""
    seed: int = 0
    """Seed for weights, data order and sampling."""
    output_dir: str = "runs/distill"
    """Where metrics, checkpoints and the student go."""
    log_every: int = 1
    """Write a metrics.jsonl record every this many steps."""
    eval_every: int = 100
    """Held-out evaluation every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches of held-out data per evaluation."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    progress: bool = True
    """Show the rich progress bar."""


@dataclass
class Config:
    """A whole distillation run."""

    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The frozen teacher."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    losses: list[LossConfig] = field(default_factory=list)
    """The loss terms (at least one)."""
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    """How the terms are weighted."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and output."""


# ---------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right below each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


# ---------------------------------------------------------------- dict -> dataclass


def _closest(key: str, options: list[str]) -> str:
    near = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean '{near[0]}'?" if near else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise ConfigError(f"{path}: unknown key; valid keys here: {', '.join(names)}{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    obj = cls(**kwargs)
    if cls is LossConfig:
        object.__setattr__(obj, "_set", set(data))  # which keys the user wrote, for validation
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-dict form of a config (what ``--print-config`` prints and runs save)."""
    if isinstance(obj, LossConfig) and obj.type in LOSS_FIELDS:
        keep = COMMON_LOSS_FIELDS | LOSS_FIELDS[obj.type]
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name in keep}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------- overrides


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``key.sub=value`` to a raw config dict; list items are addressed by index (``losses.0.weight=2``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: write it as key.sub=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is a value, not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is not a mapping")


def _index(part: str, node: list, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {where}: '{part}' is not an index of a list of {len(node)} items")
    return int(part)


# ---------------------------------------------------------------- load + validate


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None) -> Config:
    """Read YAML (or take ``data``), apply dotted overrides, build and validate a Config."""
    if data is None:
        if path is None:
            raise ConfigError("no config given: pass a YAML file")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping at the top level")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _one_of(value: str, options, where: str) -> None:
    if value not in options:
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(options)}{_closest(str(value), list(options))}")


def validate(cfg: Config) -> None:
    """Check values and cross-field rules; fill per-type defaults in the loss terms."""
    from alignkd.data import BOS_SETTINGS
    from alignkd.losses import KL_KINDS
    from alignkd.precision import DTYPE_NAMES, MIXED_PRECISION

    if not cfg.teacher.path:
        raise ConfigError("teacher.path: required (a local model folder or a hub id)")
    # "key=~/x" on a command line reaches us unexpanded (the shell only expands a leading ~).
    for obj, name in ((cfg.teacher, "path"), (cfg.student, "path"), (cfg.data, "train"), (cfg.data, "eval"), (cfg.train, "output_dir")):
        value = getattr(obj, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, name, os.path.expanduser(value))
    _one_of(cfg.teacher.dtype, ("auto", *DTYPE_NAMES), "teacher.dtype")
    _one_of(cfg.student.dtype, ("auto", *DTYPE_NAMES), "student.dtype")
    _one_of(cfg.teacher.task, ("causal_lm", "sequence_classification", "masked_lm"), "teacher.task")
    chosen = [k for k in ("path", "from_teacher", "config") if getattr(cfg.student, k) is not None]
    if len(chosen) != 1:
        raise ConfigError("student: set exactly one of path, from_teacher or config" + (f" (got {', '.join(chosen)})" if chosen else ""))
    _one_of(cfg.student.init, ("random", "prune"), "student.init")
    if not cfg.data.train:
        raise ConfigError("data.train: required (a text file, folder, JSONL, CSV or datasets name)")
    if cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len: must be at least 2")
    _one_of(cfg.data.bos, BOS_SETTINGS, "data.bos")
    if not cfg.losses:
        raise ConfigError("losses: add at least one term, e.g. [{type: kl}]")
    for i, loss in enumerate(cfg.losses):
        where = f"losses[{i}]"
        _one_of(loss.type, list(LOSS_FIELDS), f"{where}.type")
        extra = getattr(loss, "_set", set()) - COMMON_LOSS_FIELDS - LOSS_FIELDS[loss.type]
        if extra:
            raise ConfigError(
                f"{where}: {', '.join(sorted(extra))} does not apply to type '{loss.type}'; "
                f"it takes {', '.join(sorted(COMMON_LOSS_FIELDS | LOSS_FIELDS[loss.type]))}"
            )
        if loss.weight < 0:
            raise ConfigError(f"{where}.weight: must be >= 0")
        if loss.temperature is None and loss.type in DEFAULT_TEMPERATURE:
            loss.temperature = DEFAULT_TEMPERATURE[loss.type]
        if loss.temperature is not None and loss.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0")
        if "layers" not in getattr(loss, "_set", set()) and loss.type in DEFAULT_LAYERS:
            loss.layers = DEFAULT_LAYERS[loss.type]
        if loss.type in ("kl", "blockwise"):
            _one_of(loss.kind, KL_KINDS, f"{where}.kind")
            loss.beta = 0.5 if loss.beta is None else loss.beta
            loss.alpha = 0.1 if loss.alpha is None else loss.alpha
            if loss.kind == "jsd" and not 0 < loss.beta < 1:
                raise ConfigError(f"{where}.beta: jsd needs 0 < beta < 1")
        if loss.type == "dkd":
            loss.beta = 8.0 if loss.beta is None else loss.beta
            loss.alpha = 1.0 if loss.alpha is None else loss.alpha
        if loss.type == "hidden":
            _one_of(loss.metric, ("mse", "cosine", "standardized"), f"{where}.metric")
        _one_of(loss.projector, ("linear", "linear_norm"), f"{where}.projector")
        for part in loss.of:
            _one_of(part, ("q", "k", "v"), f"{where}.of")
        layers = loss.layers
        if isinstance(layers, str):
            _one_of(layers, ("auto", "last", "source", "adaptive"), f"{where}.layers")
            if layers == "adaptive" and loss.type not in ("hidden",):
                raise ConfigError(f"{where}.layers: adaptive applies to hidden losses only; use auto, last or explicit pairs")
        elif not (
            isinstance(layers, list)
            and layers
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in layers)
        ):
            raise ConfigError(f"{where}.layers: use auto, last, source, adaptive, or a list of [student, teacher] pairs like [[0, 3], [1, 7]]")
        for sched, kind_where in ((loss.weight_schedule, "weight_schedule"), (loss.temperature_schedule, "temperature_schedule")):
            if sched is not None:
                _one_of(sched.kind, ("constant", "warmup", "linear", "cosine"), f"{where}.{kind_where}.kind")
        if loss.num_relation_heads is not None and loss.num_relation_heads < 1:
            raise ConfigError(f"{where}.num_relation_heads: must be >= 1")
        if loss.max_tokens is not None and loss.max_tokens < 1:
            raise ConfigError(f"{where}.max_tokens: must be >= 1 (or null for all positions)")
        ts = loss.temperature_schedule
        if ts is not None:
            if ts.kind == "warmup" or min(ts.start, ts.end if ts.kind != "constant" else ts.start) <= 0:
                raise ConfigError(f"{where}.temperature_schedule: temperatures must stay > 0 (use constant, linear or cosine with start and end > 0)")
        if cfg.weighting.strategy != "static" and loss.weight == 0:
            raise ConfigError(f"{where}.weight: 0 under {cfg.weighting.strategy} weighting would be learned away from 0; remove the term instead")
    used: set[str] = set()
    for i, loss in enumerate(cfg.losses):
        if loss.name is not None:
            if loss.name in used:
                raise ConfigError(f"losses[{i}].name: '{loss.name}' is used by two terms; names must be unique")
            used.add(loss.name)
    for loss in cfg.losses:
        if loss.name is None:
            name, k = loss.type, 1
            while name in used:
                k += 1
                name = f"{loss.type}_{k}"
            loss.name = name
            used.add(name)
    _one_of(cfg.weighting.strategy, ("static", "gradnorm", "uncertainty"), "weighting.strategy")
    if cfg.weighting.every < 1:
        raise ConfigError("weighting.every: must be >= 1")
    t = cfg.train
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be >= 1")
    _one_of(t.mixed_precision, ("auto", *MIXED_PRECISION), "train.mixed_precision")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError("train.max_minutes: must be > 0 (or null for no time limit)")
    if t.lr <= 0:
        raise ConfigError("train.lr: must be > 0")
