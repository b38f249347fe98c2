"""The one display: a console on stderr, status lines, and live rows that fall back to plain lines.

Everything alignkd shows while it works goes through here: training's progress
(:class:`Progress`), the rows of ``alignkd eval`` and ``alignkd assets``
(:class:`Tasks`) and the demo's stages (:class:`Stages`). Results go to stdout;
this goes to stderr.

On a terminal the rows are live rich bars. Redirected (CI, ``nohup``, a log
file) a live display shows nothing until the end, so each prints plain lines
instead: training after the first step, then every ``PLAIN_EVERY_S`` seconds
and at the last step; a task when it starts, changes what it is doing, and ends.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichProgress,
)
from rich.table import Column
from rich.text import Text

PLAIN_EVERY_S = 30.0


def stderr_console() -> Console:
    """Where progress and status lines go: stderr, so stdout holds only results."""
    return Console(stderr=True)


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- training


class Progress:
    """A one-line live bar, or plain lines when the console is not a terminal; ``note`` prints a line above it."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.console = console or stderr_console()
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
        if record.get("generated_tokens"):  # a step that sampled: its sampling apart from its training
            info += f" | sampled {record['generated_tokens_per_s']:.0f} tok/s, {100 * record['gen_share']:.0f}% of step"
        if self.live:
            self.bar.update(self.task, completed=step, total=self.total, info=info)
            return
        now = time.perf_counter()
        if step == self.start + 1 or step >= self.total or now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            per_step = (now - self.t0) / max(step - self.start, 1)
            eta = clock(per_step * (self.total - step))
            self.console.print(
                f"step {step}/{self.total} {info} elapsed {clock(now - self.t0)} eta {eta}", highlight=False
            )

    def note(self, record: dict) -> None:
        if not self.enabled:
            return
        parts = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in record.items()
            if isinstance(v, float) or (isinstance(v, str) and k != "split")
        )
        self.console.print(f"step {record.get('step')}: {parts}", highlight=False)

    def stop(self) -> None:
        if self.enabled:
            if self.live:
                self.bar.stop()
            self.enabled = False


# ----------------------------------------------------------------------------- tasks


class _Status(SpinnerColumn):
    """A spinner while a task runs, then its outcome (e.g. ok or failed)."""

    def render(self, task):
        return Text.from_markup(task.fields["status"]) if task.finished else super().render(task)


class Tasks:
    """Live rows, one per named task (a spinner, its name, a bar with ``bar``, elapsed time, what it is doing).

    ``say`` prints a status line above the rows. Off a terminal the rows become
    plain lines (``name: text`` when a task's text changes, ``name: status text``
    when it ends); ``enabled=False`` shows nothing. ``transient`` rows vanish
    when the display stops.
    """

    def __init__(
        self, enabled: bool = True, *, bar: bool = False, transient: bool = False, console: Console | None = None
    ):
        self.enabled = enabled
        self.seconds = 0.0
        self.ids: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        if not enabled:
            return
        self.console = console or stderr_console()
        self.live = self.console.is_terminal
        wide = Column(no_wrap=True, overflow="ellipsis", ratio=1)  # a long line is cut short, not the spinner and clock
        columns = [
            _Status(table_column=Column(no_wrap=True, min_width=6)),
            TextColumn("[bold]{task.fields[name]}", table_column=Column(no_wrap=True)),
            *([BarColumn(), MofNCompleteColumn()] if bar else []),
            TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
            TextColumn("{task.description}", table_column=wide),
        ]
        self.rows = RichProgress(*columns, console=self.console, transient=transient, expand=True)

    def __enter__(self) -> Tasks:
        if self.enabled and self.live:
            self.rows.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.live:
            self.rows.stop()

    def say(self, line: str) -> None:
        """A status line (rich markup) above the live rows."""
        if self.enabled:
            self.console.print(line, highlight=False)

    def update(self, name: str, text: str | None = None, *, done: int | None = None, total: int | None = None) -> None:
        """Start or update the row ``name``: what it is doing, how far it is (None: unchanged)."""
        if not self.enabled:
            return
        if name not in self.ids:
            self.ids[name] = self.rows.add_task("", total=total, name=name, status="")
        changed = text is not None and text != self.texts.get(name)
        if changed:
            self.texts[name] = text
            if not self.live:
                self.console.print(f"{name}: {text}", highlight=False, markup=False)
        self.rows.update(self.ids[name], completed=done, total=total, **({"description": text} if changed else {}))

    def finish(self, name: str, status: str, text: str) -> None:
        """End the row ``name`` with ``status`` (rich markup, e.g. ``[green]ok``) and a last ``text``."""
        if not self.enabled:
            return
        self.update(name)
        self.texts[name] = text
        self.rows.update(self.ids[name], description=text, total=1, completed=1, status=status)
        if not self.live:
            self.console.print(f"{name}: {status} {escape(text)}", highlight=False)

    def remove(self, name: str) -> None:
        if self.enabled and name in self.ids:
            self.rows.remove_task(self.ids.pop(name))

    @contextmanager
    def running(self, name: str):
        """A row while the block runs, removed after; yields ``on_step(done, total)``; then ``self.seconds`` is its wall
        time."""

        def on_step(done: int, total: int) -> None:
            self.update(name, done=done, total=total)

        self.update(name)
        t0 = time.perf_counter()
        try:
            yield on_step
        finally:
            self.seconds = time.perf_counter() - t0
            self.remove(name)


# ----------------------------------------------------------------------------- stages


class Stages:
    """The stages of a long job: a rule with a title as one starts, a line with its seconds as it ends."""

    def __init__(self, console: Console | None = None):
        self.console = console or stderr_console()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, title: str):
        self.console.rule(f"[bold]{title}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.console.print(f"[green]{name}: {self.seconds[name]:.0f} s")


@contextmanager
def hf_bars_hidden():
    """Hide transformers' progress bars inside the block (ours is on screen) and restore them after it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


DEBUG = "ALIGNKD_DEBUG"
"""Set by ``alignkd --debug``: the libraries' own reports are shown, not only alignkd's line about them."""


def hide_hf_bars() -> None:
    """Hide transformers' progress bars for the rest of the process: every command shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
