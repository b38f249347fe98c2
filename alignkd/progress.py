"""The training progress display: step, tokens/s, loss terms and ETA, with rich."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Progress:
    """A one-line live bar; ``note`` prints a line above it (e.g. evaluation results)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.bar = RichProgress(
            TextColumn("[bold]distil"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task("distil", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        terms = " ".join(f"{k[5:]}={v:.3g}" for k, v in record.items() if k.startswith("loss/"))
        info = f"loss={record['loss']:.4g} {terms} {record['tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task, completed=step, info=info)

    def note(self, record: dict) -> None:
        if not self.enabled:
            return
        parts = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        self.bar.console.print(f"step {record.get('step')}: {parts}")

    def stop(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False
