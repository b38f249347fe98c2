"""Preparing one asset: its steps, each timed and shown, each failure turned into one line."""

from __future__ import annotations

import time
from contextlib import contextmanager

from alignkd.display import Tasks
from alignkd.errors import AssetError


class Job:
    """Preparing one asset: its name, the display, the retry command, each step's seconds."""

    def __init__(self, asset: str, ui: Tasks, retry: str):
        self.asset, self.ui, self.retry = asset, ui, retry
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, what: str, doing: str):
        """Show ``doing``; turn any failure inside into a one-line AssetError naming ``what``."""
        self.ui.update(self.asset, doing)
        start = time.perf_counter()
        try:
            yield
        except AssetError:
            raise
        except Exception as e:
            raise AssetError(f"{self.asset}: {what} failed ({reason(e)}); rerun `{self.retry}`") from e
        finally:
            self.seconds[what] = round(time.perf_counter() - start, 2)


def reason(e: Exception) -> str:
    """An exception as a short phrase on one line (ValueErrors here are already phrased)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, ValueError):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 240 else text[:237] + "..."
