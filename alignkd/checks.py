"""One-line checks of a value against its allowed options, with a did-you-mean."""

from __future__ import annotations

import difflib
from typing import Any

from alignkd.errors import ConfigError


def closest(key: str, options) -> str:
    """``"; did you mean 'x'?"`` for the option nearest ``key``, or ``""``."""
    near = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f"; did you mean '{near[0]}'?" if near else ""


def one_of(value: Any, options, where: str) -> None:
    """Raise ConfigError naming ``where`` unless ``value`` is among ``options`` (with a did-you-mean)."""
    if value not in options:
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(map(str, options))}{closest(value, options)}")
