"""The parallel back-end of a run, chosen once at set-up: one object that does what the loop asks of it.

- ``Backend``: one process, or DDP through Accelerate (``accelerator.prepare``:
  NCCL on GPUs, gloo on CPUs).
- ``FSDP2``: an FSDP launch (``configs/accelerate/fsdp.yaml``); alignkd shards the
  student's blocks itself (``backend.fsdp``) and keeps the rest whole.
- ``ZeRO``: a DeepSpeed launch (``configs/accelerate/deepspeed.yaml``); the student
  goes to a DeepSpeed engine (``backend.zero``), stage 1, 2 or 3.

The set-up, the step, checkpoints and the export call these methods and never
ask which back-end is running. A frozen teacher is placed by the same object:
whole on each process, or split over them (FSDP2, or ZeRO-3 inference under a
DeepSpeed launch).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from alignkd.align.plan import unwrap
from alignkd.backend import fsdp, zero
from alignkd.backend.launch import shards_student
from alignkd.config import OPTIMIZERS
from alignkd.disk import save_torch


class Backend:
    """One process, or DDP: Accelerate wraps the side and averages its gradients."""

    layout: str | None = None
    """The ``state.json`` key naming how a checkpoint is split over the processes; None: one whole state."""
    optimizers: tuple[str, ...] = OPTIMIZERS
    """The ``train.optimizer`` choices this back-end steps (and is tested with)."""
    adapters: bool = True
    """Whether it trains a student with PEFT adapters (``student.peft``)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    # ------------------------------------------------------------------ set-up

    def place_teacher(self, teacher: nn.Module, placement: str, say=print, keep_whole=()) -> nn.Module:
        """Put the frozen teacher on this process's device: whole (``replicate``) or its blocks split (``shard``).

        With one process it stays whole: there is nothing to split it over. Its
        dtype is ``teacher.dtype`` either way.
        """
        acc = self.accelerator
        if placement == "replicate" or acc.num_processes == 1:
            return teacher.to(acc.device)
        return fsdp.shard_teacher(teacher, acc, say)

    def shard(self, side: nn.Module, say=print) -> None:
        """Split the side over the processes before its optimizer is built (FSDP2 replaces parameters)."""

    def param_groups(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        """``params`` split into the groups AdamW can step together."""
        return [params] if params else []

    def wrap(self, side: nn.Module, optimizer, cfg, say=print, keep_whole=()) -> tuple[nn.Module, object]:
        """The side and optimizer the loop trains with (wrapped for DDP, FSDP or ZeRO)."""
        return self.accelerator.prepare(side, optimizer)

    # ------------------------------------------------------------------ one step

    @contextlib.contextmanager
    def gradient_sync(self, side: nn.Module, sync: bool):
        """Average gradients over the processes in this backward (``sync``), or only accumulate them."""
        if sync:
            yield
        else:
            with self.accelerator.no_sync(side):
                yield

    def backward(self, side: nn.Module, loss: torch.Tensor, sync: bool) -> None:
        """Backward of one micro-batch's (already share-scaled) loss; ``sync``: the step's last micro-batch."""
        self.accelerator.backward(loss)

    @contextlib.contextmanager
    def held_gathered(self, side: nn.Module):
        """Keep sharded weights gathered through extra backwards (GradNorm's one per term)."""
        yield

    def ensure_whole(self, side: nn.Module) -> None:
        """Make sure the weights read outside their module's forward (the fused head) are whole here."""

    def average(self, params: list[nn.Parameter]) -> None:
        """Average over the processes the gradients no wrapper averaged (``params``: a learned weighting's)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad.copy_(acc.reduce(p.grad, "mean"))

    def clip_and_step(self, side: nn.Module, optimizer, max_norm: float, skip: bool, fp16: bool) -> tuple[float, bool]:
        """Clip the gradients to ``max_norm`` (0: off) and step unless ``skip`` or the gradient is not finite.

        Returns (gradient norm before clipping, whether the step was applied).
        Under fp16 an infinite gradient is the loss scaler's business: it skips the
        step and rescales, so the optimizer is stepped anyway.
        """
        # With clipping off, an infinite bound still returns the norm for the log.
        norm = self._clip(side, max_norm if max_norm > 0 else math.inf)
        if skip or (not math.isfinite(norm) and not fp16):
            return norm, False
        optimizer.step()
        return norm, True

    def _clip(self, side: nn.Module, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(side.parameters(), max_norm))

    # ------------------------------------------------------------------ saving

    def export(self, side: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """(the student's state dict, or None for its own; the projectors' and mixtures'), for the exported run.

        A collective where weights are split: every process calls it.
        """
        inner = unwrap(side)
        return None, inner.aux_state()

    def save(self, side: nn.Module, optimizer, folder: Path) -> dict:
        """Write this process's part of a checkpoint into ``folder`` (every process calls it); returns what the
        main process adds to ``state.pt``."""
        if self.accelerator.is_main_process:
            save_model(unwrap(side), str(folder / "side.safetensors"))  # student and projectors; handles tied weights
            return {"optimizer": optimizer.state_dict()}
        return {}

    def load(self, side: nn.Module, optimizer, folder: Path, state: dict) -> None:
        """Restore what :meth:`save` wrote (``state``: the loaded ``state.pt``)."""
        load_model(unwrap(side), str(folder / "side.safetensors"), device=str(self.accelerator.device))
        optimizer.load_state_dict(state["optimizer"])

    def describe(self, layout: str) -> str:
        """How a run saved with ``layout`` was launched, for a one-line error."""
        if layout == "sharded_over":
            return "whose student was sharded (an FSDP launch)"
        if layout.startswith("zero"):
            return f"under DeepSpeed ZeRO-{layout[4:-5]} (a DeepSpeed launch)"
        return "with one whole student (no FSDP or DeepSpeed launch)"


class FSDP2(Backend):
    """An FSDP launch: the student's blocks sharded with FSDP2, the rest whole and averaged like DDP's."""

    optimizers = ("adamw",)  # Adafactor's row and column statistics over sharded matrices are untested here
    adapters = False  # frozen base and trained adapters in one sharded unit: untested here

    layout = "sharded_over"

    def __init__(self, accelerator: Accelerator):
        super().__init__(accelerator)
        self.whole: list[nn.Parameter] = []
        """The side's parameters left whole on every process; their gradients are averaged by :meth:`average`."""

    def shard(self, side: nn.Module, say=print) -> None:
        self.whole = fsdp.shard_student(side, self.accelerator, say)

    def param_groups(self, params):
        # AdamW's foreach maths cannot mix shards and whole tensors in a group.
        parts = ([p for p in params if not fsdp.is_sharded(p)], [p for p in params if fsdp.is_sharded(p)])
        return [part for part in parts if part]

    def wrap(self, side, optimizer, cfg, say=print, keep_whole=()):
        return side, self.accelerator.prepare(optimizer)

    @contextlib.contextmanager
    def gradient_sync(self, side, sync):
        side.set_requires_gradient_sync(sync)  # FSDP2 reduce-scatters the blocks' gradients when told to
        yield

    @contextlib.contextmanager
    def held_gathered(self, side):
        side.set_reshard_after_backward(False, recurse=True)
        try:
            yield
        finally:  # the step's own backward frees them
            side.set_reshard_after_backward(True, recurse=True)

    def average(self, params):
        super().average([*params, *self.whole])

    def _clip(self, side, max_norm):
        acc = self.accelerator
        acc.unscale_gradients()
        grads = [p.grad for p in side.parameters() if p.grad is not None]
        # Shards add up over the processes; whole gradients are already the same on each.
        zero_ = torch.zeros((), device=acc.device)
        local = sum((g.to_local().float().pow(2).sum() for g in grads if fsdp.is_sharded(g)), zero_)
        whole = sum((g.float().pow(2).sum() for g in grads if not fsdp.is_sharded(g)), zero_)
        norm = (acc.reduce(local, "sum") + whole).sqrt()
        coef = min(max_norm / (float(norm) + 1e-6), 1.0)
        for g in grads:
            g.mul_(coef)
        return float(norm)

    def export(self, side):
        inner = unwrap(side)
        return fsdp.full_state(inner.student), inner.aux_state()

    def save(self, side, optimizer, folder):
        acc = self.accelerator
        acc.wait_for_everyone()  # the main process made the folder
        rank = acc.process_index
        state, partition = fsdp.local_state(unwrap(side)), fsdp.local_optimizer_state(optimizer)
        failed = None
        try:
            save_file(state, str(folder / f"side-rank{rank}.safetensors"))
            save_torch(partition, folder / f"optimizer-rank{rank}.pt")
        except Exception as e:  # raised after the barrier, which every process must reach
            failed = e
        acc.wait_for_everyone()
        if failed is not None:
            raise failed
        return {}

    def load(self, side, optimizer, folder, state):
        rank = self.accelerator.process_index
        fsdp.load_local_state(unwrap(side), load_file(str(folder / f"side-rank{rank}.safetensors")))
        saved = torch.load(folder / f"optimizer-rank{rank}.pt", map_location="cpu", weights_only=True)
        fsdp.load_local_optimizer_state(optimizer, saved)


class ZeRO(Backend):
    """A DeepSpeed launch: the student in a ZeRO engine (stage 1, 2 or 3), which reduces, clips and steps."""

    optimizers = ("adamw",)  # ZeRO partitions AdamW's state; another optimizer in its engine is untested here
    adapters = False  # a LoRA student's optimizer state is already small: ZeRO has little to partition

    def __init__(self, accelerator: Accelerator, settings: dict):
        super().__init__(accelerator)
        self.settings = settings
        """The launch's ``zero_optimization`` settings (``zero.launch_zero``)."""
        self.layout = f"zero{settings['stage']}_over"

    def place_teacher(self, teacher, placement, say=print, keep_whole=()):
        acc = self.accelerator
        if placement == "replicate" or acc.num_processes == 1:
            return teacher.to(acc.device)
        return zero.shard_teacher(teacher.to(acc.device), self.settings, acc.num_processes, say, keep_whole)

    def wrap(self, side, optimizer, cfg, say=print, keep_whole=()):
        engine = zero.wrap(side, optimizer, self.settings, cfg, self.accelerator.num_processes, say, keep_whole)
        return engine, engine.optimizer  # ZeRO's, stepping the AdamW's groups the scheduler drives

    @contextlib.contextmanager
    def gradient_sync(self, side, sync):
        yield  # the accumulation boundary is set with the backward

    def backward(self, side, loss, sync):
        zero.backward(side, loss, sync)

    def ensure_whole(self, side):
        zero.ensure_whole(side)

    def clip_and_step(self, side, optimizer, max_norm, skip, fp16):
        # ZeRO clips over every process's partition and skips a step whose gradient is not
        # finite (a non-finite term makes it so), in one call; the norm is known after it.
        return zero.step(side)

    def export(self, side):
        return zero.export_states(side)

    def save(self, side, optimizer, folder):
        acc = self.accelerator
        # The main process writes the side whole; under ZeRO-3 every process takes part in the gather.
        whole = zero.side_state(side) if acc.is_main_process or zero.is_stage3(side) else None
        acc.wait_for_everyone()  # the main process made the folder
        partition = zero.partition_state(side)
        failed = None
        try:
            save_torch(partition, folder / f"optimizer-rank{acc.process_index}.pt")
        except Exception as e:  # raised after the barrier, which every process must reach
            failed = e
        acc.wait_for_everyone()
        if failed is not None:
            raise failed
        if acc.is_main_process:  # ZeRO's parameters are views of its flat buffers: saved as copies
            save_file(whole, str(folder / "side.safetensors"))
        return {}

    def load(self, side, optimizer, folder, state):
        # Under ZeRO-3 the weights come back with the optimizer partition (its master copy).
        if not zero.is_stage3(side):
            fsdp.load_local_state(unwrap(side), load_file(str(folder / "side.safetensors")))
        saved = torch.load(
            folder / f"optimizer-rank{self.accelerator.process_index}.pt", map_location="cpu", weights_only=True
        )
        zero.load_partition_state(side, saved)  # after the weights: ZeRO sets them again from its master copy


def make_backend(accelerator: Accelerator) -> Backend:
    """The back-end this process was launched for."""
    if shards_student():
        return FSDP2(accelerator)
    if settings := zero.launch_zero():
        return ZeRO(accelerator, settings)
    return Backend(accelerator)
