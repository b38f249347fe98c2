"""How a variant's overrides change the base config, and how ``${...}`` names in a study file become paths.

Merge rules (:func:`merge`): a mapping merges into a mapping key by key, at any
depth; a dotted key (``student.from_teacher.select: search``) is the same as the
nested mappings it spells, and a number in it indexes a list
(``losses.0.temperature: 2``); anything else, lists included, replaces what was
there (``losses: [...]`` is the whole new list; ``null`` sets the field to
null). The base is never changed.

Names (:func:`substitute`): ``${assets.teacher}``, ``${assets.sotu}``,
``${assets.moby_dick}``, ``${assets.sentiment}`` (the packaged assets, from
``alignkd assets``' cache) and ``${prepare.NAME}`` (what a ``prepare:`` step of the
study makes), anywhere inside a string value, e.g. ``${assets.sentiment}/train.csv``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from alignkd.config.load import set_dotted

NAME = re.compile(r"\$\{([^}]*)\}")


def merge(base: dict, overrides: dict, where: str = "set") -> dict:
    """A deep copy of ``base`` with ``overrides`` applied by the rules above."""
    out = copy.deepcopy(base)
    _merge_into(out, overrides, where)
    return out


def _merge_into(node: dict | list, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        set_dotted(node, str(key).split("."), copy.deepcopy(value), f"{where}.{key}", merge=True)


def names_in(value: Any) -> set[str]:
    """Every ``${...}`` name used anywhere in ``value`` (nested dicts and lists)."""
    if isinstance(value, str):
        return {m.strip() for m in NAME.findall(value)}
    if isinstance(value, dict):
        return set().union(*(names_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(names_in(v) for v in value)) if value else set()
    return set()


def substitute(value: Any, resolve: Callable[[str], str]) -> Any:
    """``value`` with every ``${name}`` inside its strings replaced by ``resolve(name)``."""
    if isinstance(value, str):
        return NAME.sub(lambda m: resolve(m.group(1).strip()), value)
    if isinstance(value, dict):
        return {k: substitute(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, resolve) for v in value]
    return value


def touches(overrides: dict, path: str) -> bool:
    """Whether ``overrides`` sets the dotted ``path`` (or something inside it), nested or dotted."""
    want = path.split(".")
    for key, value in overrides.items():
        parts = str(key).split(".")
        n = min(len(parts), len(want))
        if parts[:n] != want[:n]:
            continue
        if len(parts) >= len(want):
            return True
        if isinstance(value, dict) and touches(value, ".".join(want[len(parts) :])):
            return True
    return False
