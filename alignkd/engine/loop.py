"""The training loop: optimizer steps until the horizon, with logging, evaluation, checkpoints, Ctrl-C and SIGTERM.

A step counts as done the moment its optimizer step returns: an interrupt during
that step's logging, evaluation or checkpoint saves at the step, never replays it.
SIGTERM lets the step in progress finish, then saves and stops (``Preempted``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import torch

from alignkd.display import Progress
from alignkd.engine.checkpoint import save_checkpoint
from alignkd.engine.setup import Run
from alignkd.engine.sources import Drawn
from alignkd.engine.step import StepResult, optimizer_step, to_device
from alignkd.engine.trackers import numbers
from alignkd.errors import TrainingError


def draw_step(run: Run, step: int) -> list[Drawn]:
    """This process's micro-batches of ``step``, on its device, each from its source (the samplers move on)."""
    seed = run.cfg.train.seed * 100003 + step * 131
    drawn = [run.sources.draw(run, step, k, seed + k) for k in range(run.cfg.train.grad_accum)]
    for d in drawn:
        d.batch = to_device(d.batch, run.accelerator.device)
    return drawn


def next_batches(run: Run, step: int) -> list:
    """This process's micro-batches of ``step``, on its device (the samplers move on)."""
    return [d.batch for d in draw_step(run, step)]


def train_record(run: Run, step: int, r: StepResult, drawn: list[Drawn] | None = None) -> dict:
    """The ``metrics.jsonl`` record of a finished step (``drawn``: its micro-batches, for the generation figures)."""
    record = {"split": "train", "step": step, "loss": r.means["loss"]}
    record.update({f"loss/{n}": r.means[n] for n in run.weighting.names})
    record.update(run.weighting.log())
    record.update(
        {
            f"temperature/{t.cfg.name}": v
            for t, v in zip(run.terms, r.at.temperatures, strict=True)
            if v is not None and t.cfg.temperature_schedule
        }
    )
    record.update({"lr": r.lr, "tokens_per_s": r.tokens / r.seconds, "step_s": r.seconds, "grad_norm": r.grad_norm})
    if run.cfg.generation.generates and drawn is not None:
        record.update(_generation_figures(run, r, drawn))
    if r.bad:
        record.update({"skipped": 1, "bad": ",".join(r.bad)})
    return record


def _generation_figures(run: Run, r: StepResult, drawn: list[Drawn]) -> dict:
    """Sampling and training apart: tokens sampled per second of sampling, and sampling's share of the step."""
    gen_s = sum(d.gen_seconds for d in drawn)
    new = sum(d.new_tokens for d in drawn)
    acc = run.accelerator
    if acc.num_processes > 1:  # every process samples its share at once: tokens add up, time is the slowest's
        new = int(acc.reduce(torch.tensor(float(new), device=acc.device), "sum").item())
        gen_s = acc.reduce(torch.tensor(gen_s, device=acc.device), "max").item()
    out = {
        "sources": ",".join(d.source for d in drawn),
        "generated_tokens": new,
        "gen_s": gen_s,
        "gen_share": gen_s / (gen_s + r.seconds),
    }
    if gen_s > 0:
        out["generated_tokens_per_s"] = new / gen_s
    return out


class Preempted(Exception):
    """SIGTERM arrived (a scheduler preempting the job): a checkpoint was saved at a step boundary."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped by SIGTERM: saved a checkpoint at step {step} ({path}); continue with --resume")
        self.step, self.path = step, path


class _Sigterm:
    """Records a SIGTERM instead of dying of it, so the loop can stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def agreed(self, acc) -> bool:
        """Whether any process got SIGTERM (a collective with several processes: all stop at the same step)."""
        if acc.num_processes == 1:
            return self.requested
        return acc.reduce(torch.tensor(float(self.requested), device=acc.device), "sum").item() > 0


def train(run: Run, start_step: int = 0) -> dict:
    """The loop. Returns the last training and evaluation records: ``{"train": ..., "eval": ...}``.

    Raises ``Preempted`` after SIGTERM, once the step in progress is done and saved.
    """
    cfg, acc, horizon = run.cfg, run.accelerator, run.horizon
    log = _Log(run.out, acc) if acc.is_main_process else None
    progress = Progress(horizon.total, start_step, enabled=cfg.train.progress and acc.is_main_process)
    record: dict = {}
    ev: dict = {}
    done = start_step  # optimizer steps finished
    bad_in_a_row = 0
    loop_start, elapsed_before = time.perf_counter(), horizon.elapsed
    sigterm = _Sigterm()
    try:
        sigterm.__enter__()
        while not horizon.finished(done):
            data_position = (run.sampler.state_dict(), run.sources.state_dict())  # where this step's batches start
            drawn = draw_step(run, done)
            result = optimizer_step(run, done, [d.batch for d in drawn])
            done += 1  # from here on the step is applied: an interrupt must not replay it
            data_position = None
            elapsed = elapsed_before + time.perf_counter() - loop_start
            if horizon.max_seconds is not None:  # every process must agree on the last step
                elapsed = acc.reduce(torch.tensor(elapsed, device=acc.device), "max").item()
            horizon.advance(done, elapsed)
            last = horizon.finished(done)
            record = train_record(run, done, result, drawn)
            bad_in_a_row = bad_in_a_row + 1 if result.bad else 0
            if result.bad:
                progress.note({"step": done, "skipped": f"non-finite {', '.join(result.bad)}"})
            if bad_in_a_row >= cfg.train.max_bad_steps:
                if log:
                    log.write(record)
                _stop_bad(run, bad_in_a_row, result.bad)
            progress.update(done, record, total=horizon.total)
            if log and (done % cfg.train.log_every == 0 or last):
                log.write(record)
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or last:
                ev = {**run.evaluate(run.unwrapped.student), "split": "eval", "step": done}
                # The generation metrics: once, at the end, where the teacher runs (not in `alignkd finetune`).
                if last and cfg.generation.eval_prompts and run.teacher.has_weights:
                    ev.update(run.judge())
                progress.note(ev)
                if log:  # train_s: the training clock at this step (what max_minutes counts), for curves against time
                    log.write({**ev, "train_s": round(elapsed, 3)})
            # A skipped step is not saved on its own: the last good checkpoint stays the newest.
            saved = ((cfg.train.save_every and done % cfg.train.save_every == 0) and not result.bad) or last
            if saved:
                save_checkpoint(run, done)
            if sigterm.agreed(acc) and not last:
                progress.stop()
                raise Preempted(
                    done, save_checkpoint(run, done) if not saved else run.out / "checkpoints" / f"step-{done}"
                )
    except KeyboardInterrupt:
        # Never lose work: keep what the finished steps learned, then stop.
        progress.stop()
        if done > start_step:
            if data_position is not None:
                run.sampler.load_state_dict(data_position[0])  # the unfinished step's batches come again
                run.sources.load_state_dict(data_position[1])
            save_checkpoint(run, done)
            print(f"interrupted: saved a checkpoint at step {done}; continue with --resume")
        raise
    finally:
        sigterm.__exit__()
        progress.stop()
        if log:
            log.close()
    return {"train": record, "eval": ev}


def _stop_bad(run: Run, count: int, bad: list[str]) -> None:
    from alignkd.engine.checkpoint import latest_checkpoint

    good = latest_checkpoint(run.out)
    where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
    raise TrainingError(
        f"{count} steps in a row had a non-finite {', '.join(bad)}; {where} (kept as it is): "
        "lower train.lr, check the data, or use float32 and --resume"
    )


class _Log:
    """``metrics.jsonl`` (appended, flushed per record), and each record's numbers to the run's trackers
    (``engine.trackers``; none when ``train.report_to`` names none)."""

    def __init__(self, out: Path, acc):
        self.file = (out / "metrics.jsonl").open("a")
        self.acc = acc

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.acc.trackers:
            self.acc.log(numbers(record), step=record["step"])

    def close(self) -> None:
        self.file.close()
