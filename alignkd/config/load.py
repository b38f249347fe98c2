"""YAML (or a dict) -> Config: dotted overrides, typed coercion, unknown keys named with a suggestion."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from alignkd.checks import closest
from alignkd.config.schema import Config
from alignkd.errors import ConfigError
from alignkd.terms import TERM_TYPES, TermConfig


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: the string literal right below each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _term(value: Any, where: str) -> TermConfig:
    """A loss term mapping -> the config dataclass of its ``type``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with a type, e.g. {{type: kl}}, got {value!r}")
    kind = value.get("type")
    if kind not in TERM_TYPES:
        raise ConfigError(
            f"{where}.type: '{kind}' is not one of {', '.join(TERM_TYPES)}{closest(str(kind), list(TERM_TYPES))}"
        )
    cls = TERM_TYPES[kind].config
    names = [f.name for f in dataclasses.fields(cls)]
    extra = sorted(k for k in value if k not in names)
    anywhere = {f.name for t in TERM_TYPES.values() for f in dataclasses.fields(t.config)}
    typos = [k for k in extra if k not in anywhere]
    if typos:
        raise ConfigError(
            f"{where}.{typos[0]}: unknown key; valid keys here: {', '.join(names)}{closest(str(typos[0]), names)}"
        )
    if extra:
        raise ConfigError(
            f"{where}: {', '.join(extra)} does not apply to type '{kind}'; it takes {', '.join(sorted(names))}"
        )
    return from_dict(cls, value, where)


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
    if tp is TermConfig:
        return _term(value, where)
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
            raise ConfigError(f"{path}: unknown key; valid keys here: {', '.join(names)}{closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-dict form of a config (what ``--print-config`` prints and runs save); a term holds only its type's
    fields."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def section_defaults() -> dict:
    """The plain-dict defaults of every config section but ``losses`` (a run's config before a setting existed
    held its default)."""
    return {f.name: to_dict(f.default_factory()) for f in dataclasses.fields(Config) if f.name != "losses"}


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``key.sub=value`` to a raw config dict; list items are addressed by index (``losses.0.weight=2``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: write it as key.sub=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    set_dotted(data, key.strip().split("."), value, f"override {key.strip()}")


def set_dotted(node: Any, parts: list[str], value: Any, where: str, *, merge: bool = False) -> None:
    """Set the value at the dotted path ``parts`` inside raw config data (dicts and lists), in place.

    A number indexes a list; mappings missing on the way are created. ``merge``: a
    mapping ``value`` merges key by key into a mapping or list already there, each
    of its keys itself a dotted path (how a study's variant changes its base).
    Errors name ``where``.
    """
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if not head.lstrip("-").isdigit() or not -len(node) <= int(head) < len(node):
            raise ConfigError(f"{where}: '{head}' is not an index of a list of {len(node)} items")
        key: Any = int(head)
    elif isinstance(node, dict):
        key = head
        if rest and node.get(head) is None:
            node[head] = {}  # a dotted key creates the mappings it passes through
    else:
        raise ConfigError(f"{where}: '{head}' sits under a value, not under a mapping or list")
    if rest:
        set_dotted(node[key], rest, value, where, merge=merge)
    elif (
        merge
        and isinstance(value, dict)
        and isinstance(node[key] if isinstance(node, list) else node.get(key), (dict, list))
    ):
        for sub, v in value.items():
            set_dotted(node[key], str(sub).split("."), v, f"{where}.{sub}", merge=True)
    else:
        node[key] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None
) -> Config:
    """Read YAML (or take ``data``), apply dotted overrides, build a validated Config."""
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
    return from_dict(Config, data)
