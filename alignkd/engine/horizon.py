"""When training ends: after a number of optimizer steps, or a time budget, whichever comes first."""

from __future__ import annotations

import math


class Horizon:
    """The projected final step of a run, for the schedules and the loop's stop.

    Without a time budget, ``total`` is ``steps``. With one, it is the step at
    which the budget will run out, projected from the mean time per step so far
    (evaluations and checkpoints included), never more than ``steps``. The
    learning-rate, weight and temperature schedules read ``total``, so a run cut
    by time still warms up, decays and ends at its final learning rate instead of
    stopping mid-schedule. Time spent before a resume is carried in ``elapsed``.
    """

    def __init__(self, steps: int, max_seconds: float | None = None):
        self.steps, self.max_seconds = steps, max_seconds
        self.total = steps
        """Projected number of optimizer steps of the whole run."""
        self.resume(0, 0.0)

    def resume(self, step: int, elapsed: float) -> None:
        """Continue from ``step`` after ``elapsed`` training seconds (a checkpoint's)."""
        self.elapsed = elapsed
        """Training seconds so far, across resumes."""
        self._start_step, self._start_elapsed = step, elapsed

    def advance(self, steps_done: int, elapsed: float) -> None:
        """Record that ``steps_done`` steps are finished after ``elapsed`` training seconds; re-project ``total``."""
        self.elapsed = elapsed
        if self.max_seconds is None:
            return
        done_here = steps_done - self._start_step
        if done_here <= 0:
            return
        per_step = (elapsed - self._start_elapsed) / done_here
        left = max(self.max_seconds - elapsed, 0.0)
        # Floor: a step that would end past the budget is not started.
        more = math.floor(left / per_step) if per_step > 0 else self.steps
        self.total = max(steps_done, min(self.steps, steps_done + more))

    def finished(self, steps_done: int) -> bool:
        return steps_done >= self.total
