"""The training progress display: step, loss terms, tokens/s and ETA.

On a terminal it is a live rich bar. Redirected (CI, ``nohup``, a log file) a
live bar shows nothing until the end, so it prints a plain line instead: after
the first step, then every ``PLAIN_EVERY_S`` seconds, and at the last step.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY_S = 30.0


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line live bar, or plain lines when the console is not a terminal; ``note`` prints a line above it."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.console = console or Console(stderr=True)
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        self.last_line = -float("inf")
        self.live = self.console.is_terminal
        if not self.live:
            return
        self.bar = RichProgress(
            TextColumn("[bold]distil"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.bar.add_task("distil", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, record: dict, total: int | None = None) -> None:
        if not self.enabled:
            return
        self.total = total if total is not None else self.total
        terms = " ".join(f"{k[5:]}={v:.3g}" for k, v in record.items() if k.startswith("loss/"))
        info = f"loss={record['loss']:.4g} {terms} {record['tokens_per_s']:.0f} tok/s"
        if self.live:
            self.bar.update(self.task, completed=step, total=self.total, info=info)
            return
        now = time.perf_counter()
        if step == self.start + 1 or step >= self.total or now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            per_step = (now - self.t0) / max(step - self.start, 1)
            eta = _eta(per_step * (self.total - step))
            self.console.print(f"step {step}/{self.total} {info} elapsed {_eta(now - self.t0)} eta {eta}", highlight=False)

    def note(self, record: dict) -> None:
        if not self.enabled:
            return
        parts = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        self.console.print(f"step {record.get('step')}: {parts}", highlight=False)

    def stop(self) -> None:
        if self.enabled:
            if self.live:
                self.bar.stop()
            self.enabled = False
