"""DeepSpeed ZeRO for the student under a DeepSpeed launch (``configs/accelerate/deepspeed.yaml``).

alignkd runs DeepSpeed's engine itself rather than through Accelerate's
plugin, whose ``backward`` also steps the optimizer, before alignkd's
accumulation, clipping and non-finite checks could see the gradients. Here each
micro-batch's backward goes through the engine with the accumulation boundary
set by the loop (``backward``); ZeRO reduces the gradients into each process's
partition, clips over all of them and skips a step whose gradient norm is not
finite (``step``); the loop reads the norm afterwards. Stages 1 and 2 partition
the optimizer state (and the gradients) and keep the weights whole on every
process, so the fused LM-head terms, the capture hooks and saving work as in
one process. Stage 3 partitions the weights too: each module's are gathered
inside its own forward and backward, except the output head's when the
fused LM-head terms read it (outside the head's forward): like FSDP2's
(``backend.fsdp``), it stays whole on every process, its gradient
partitioned. Saving gathers the weights (``copied_state``). A learned
weighting's parameters, outside the model, get a small AdamW of their own
(``wrap``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from alignkd.errors import ConfigError

DEEPSPEED_LAUNCH = "ACCELERATE_USE_DEEPSPEED"
"""Set by ``accelerate launch`` with a DeepSpeed config."""


def _env(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def launch_zero() -> dict | None:
    """The ``zero_optimization`` settings this process was launched with (None: not a DeepSpeed launch); refuses what
    alignkd cannot run.

    From Accelerate's ``deepspeed_config`` (``zero_stage``, the offload devices),
    or the ``zero_optimization`` section of its ``deepspeed_config_file``, whose
    other settings (bucket sizes, ``stage3_param_persistence_threshold``...) pass through.
    """
    if _env(DEEPSPEED_LAUNCH) not in ("1", "true", "yes"):
        return None
    zero = {"stage": _env("ACCELERATE_DEEPSPEED_ZERO_STAGE")}
    offload = {_env("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"), _env("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")}
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if path and path.lower() != "none":
        try:
            zero = {**zero, **json.loads(Path(path).read_text()).get("zero_optimization", {})}
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"accelerate launch: deepspeed_config_file {path} cannot be read ({e}); fix the path or the JSON"
            ) from None
        offload |= {
            str((zero.get(k) or {}).get("device", "none")).lower() for k in ("offload_optimizer", "offload_param")
        }
    stage = str(zero["stage"])
    if stage not in ("1", "2", "3"):
        raise ConfigError(
            f"accelerate launch: DeepSpeed ZeRO stage {stage or '?'} has nothing to partition; "
            "set zero_stage: 1, 2 or 3 "
            "(configs/accelerate/deepspeed.yaml), or launch with configs/accelerate/ddp.yaml"
        )
    if offload - {"", "none"}:
        raise ConfigError(
            "accelerate launch: DeepSpeed offload is not supported; "
            "set offload_optimizer_device and offload_param_device to none"
        )
    return {**zero, "stage": int(stage)}


def launch_stage() -> int | None:
    """The ZeRO stage of this launch (None: not a DeepSpeed launch)."""
    zero = launch_zero()
    return zero["stage"] if zero else None


def wrap(
    side: nn.Module, optimizer: torch.optim.Optimizer, zero: dict, cfg, num_processes: int, say=print, keep_whole=()
):
    """Hand ``side`` and its AdamW to a DeepSpeed engine with the ``zero_optimization`` settings ``zero``; returns the
    engine (``engine.optimizer`` is ZeRO's).

    The AdamW's param groups stay the ones ZeRO steps, so an LR scheduler built on
    it keeps working. Parameters of the AdamW outside ``side`` (a learned
    weighting's) move to a small AdamW of their own (``engine.beside``), stepped
    with ZeRO's at the same learning rate. Weights in bfloat16 or float16 get
    DeepSpeed's float32 master copy. Under ZeRO-3 the parameters in
    ``keep_whole`` (the fused head's) become persistent: gathered once and kept
    on every process, re-gathered by ZeRO after each step; their gradients and
    optimizer state are still partitioned.
    """
    deepspeed = _deepspeed()
    t = cfg.train
    if t.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision: fp16 under a DeepSpeed launch is not supported "
            "(its loss scaling would bypass ZeRO); use bf16 or no"
        )
    if zero["stage"] == 3 and cfg.weighting.strategy == "gradnorm":
        raise ConfigError(
            "weighting.strategy: gradnorm under DeepSpeed ZeRO-3 is not supported "
            "(its per-term gradients need the embedding weight whole); "
            "use ratio or uncertainty, zero_stage 1 or 2, or launch with configs/accelerate/fsdp.yaml"
        )
    dtype = next(side.parameters()).dtype
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * num_processes,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        # A step with a non-finite gradient is skipped by ZeRO (float32 always checks through the norm).
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    beside = _split_off(optimizer, {id(p) for p in side.parameters()})
    engine, *_ = deepspeed.initialize(model=side, optimizer=optimizer, config=ds)
    engine.beside = beside
    engine.kept_whole = []
    if zero["stage"] == 3 and keep_whole:
        engine.kept_whole = _persist(keep_whole, engine.optimizer.persistent_parameters)  # its step re-gathers them
    say(_student_line(engine, side, zero["stage"], num_processes))
    return engine


def _student_line(engine, side: nn.Module, stage: int, num_processes: int) -> str:
    """The run's line saying how the student is partitioned."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in side.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in side.parameters())
    split = (
        "weights, gradients and optimizer state"
        if stage == 3
        else "optimizer state" + (" and gradients" if stage == 2 else "")
    )
    return (
        f"student: DeepSpeed ZeRO-{stage} over {num_processes} processes, {split} partitioned "
        f"({held / 1e6:.2f}M of {total / 1e6:.2f}M weights here"
        + (
            f"; the output head's {sum(p.ds_numel for p in engine.kept_whole) / 1e6:.2f}M whole on each, "
            "for the fused LM-head terms)"
            if engine.kept_whole
            else ")"
        )
    )


def shard_teacher(teacher: nn.Module, zero: dict, num_processes: int, say=print, keep_whole=()) -> nn.Module:
    """Partition the frozen teacher's weights over the processes with ZeRO-3 inference (an engine without optimizer);
    returns the teacher.

    Each module's weights are gathered for its own forward and freed after it,
    whatever stage the student runs under. ``keep_whole`` (the teacher's head
    when the fused LM-head terms read it, outside its forward) is gathered once
    and kept. The launch's ``stage3_*`` settings apply.
    """
    deepspeed = _deepspeed()
    dtype = next(teacher.parameters()).dtype
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, **{k: v for k, v in zero.items() if k.startswith("stage3_")}},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    _persist(keep_whole)  # nothing updates them: gathered once
    # The engine owns the partitioning state that the teacher's hooks use: keep it alive with the teacher
    # (a plain attribute: assigning a Module to a Module would register the engine as the teacher's child).
    teacher.__dict__["zero_engine"] = engine
    held = sum(p.ds_tensor.numel() for p in teacher.parameters())
    total = sum(p.ds_numel for p in teacher.parameters())
    say(
        f"teacher: weights partitioned over {num_processes} processes with DeepSpeed ZeRO-3 inference "
        f"({held / 1e6:.2f}M of {total / 1e6:.2f}M parameters here"
        + (", the head whole on each)" if keep_whole else ")")
    )
    return teacher


def _persist(params, registry: list | None = None) -> list:
    """Make ZeRO-3 parameters persistent (never released after a module's forward), gather them, and add them to
    ``registry`` (an optimizer's ``persistent_parameters``, which it re-gathers after each step); returns them as a
    list."""
    params = list(params)
    for p in params:
        p.ds_persist = True
    if registry is not None:
        known = {id(p) for p in registry}
        registry.extend(p for p in params if id(p) not in known)
    if params:
        params[0].all_gather(param_list=params)
    return params


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "a DeepSpeed launch needs deepspeed: pip install deepspeed (or launch with configs/accelerate/fsdp.yaml)"
        ) from None
    return deepspeed


def _split_off(optimizer: torch.optim.Optimizer, inside: set[int]) -> tuple[torch.optim.Optimizer, list[int]] | None:
    """Move the parameters not in ``inside`` out of ``optimizer``'s groups into a new AdamW; returns it and, per its
    group, the source group's index.

    Indices, not the group dicts: loading a state dict replaces an optimizer's group dicts.
    (alignkd's optimizer puts the weighting's parameters in a group with the side's norms and biases, so no group
    is left empty.)
    """
    groups, sources = [], []
    for i, g in enumerate(optimizer.param_groups):
        out = [p for p in g["params"] if id(p) not in inside]
        if out:
            g["params"] = [p for p in g["params"] if id(p) in inside]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": out})
            sources.append(i)
    return (torch.optim.AdamW(groups), sources) if groups else None


def is_engine(side) -> bool:
    return type(side).__name__ == "DeepSpeedEngine"


def backward(engine, loss: torch.Tensor, sync: bool) -> None:
    """One micro-batch's backward; ``sync``: the step's last micro-batch (ZeRO reduces its gradients at the boundary).

    The loss arrives already scaled by its share of the step (the loop's
    ``token_share``), so the engine must not divide it by the accumulation count again.
    """
    engine.set_gradient_accumulation_boundary(sync)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> tuple[float, bool]:
    """Clip and apply the optimizer step over every process's partition; returns (gradient norm before clipping,
    applied).

    The parameters beside the side take their step with it (their gradients are
    averaged by the loop and are not clipped: ZeRO's norm is over its partitions).
    """
    engine.set_gradient_accumulation_boundary(True)
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    applied = not engine.optimizer.overflow
    if engine.beside is not None:
        beside, sources = engine.beside
        if applied:
            for g, i in zip(beside.param_groups, sources, strict=True):
                g["lr"] = engine.optimizer.param_groups[i]["lr"]  # the scheduler's, set on the group ZeRO steps
            beside.step()
        beside.zero_grad(set_to_none=True)
    return norm, applied


def is_stage3(side) -> bool:
    return is_engine(side) and side.zero_optimization_stage() == 3


def ensure_whole(side) -> None:
    """Gather the parameters ``wrap`` keeps whole where something partitioned them (a ZeRO-3 engine only; a collective
    there).

    DeepSpeed re-gathers its persistent parameters after each step; saving and
    loading a checkpoint partition them, and alignkd's fused LM-head terms read
    the head outside any module's forward, where ZeRO would gather it.
    """
    held = getattr(side, "kept_whole", None)
    if held:
        held[0].all_gather(param_list=held)  # gathers only those not available


def copied_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` whole and copied out of ZeRO's flat buffers (its parameters are views of them), on the
    CPU; tied tensors stay one.

    Under ZeRO-3 the partitioned parameters are gathered first: a collective, every process calls it.
    """
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        copies: dict[int, torch.Tensor] = {}
        return {
            k: copies.setdefault(id(v), v.detach().cpu().clone()) for k, v in module.state_dict(keep_vars=True).items()
        }


def export_states(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the student's state, the projectors' and mixtures') copied out whole (a collective under ZeRO-3)."""
    whole = copied_state(engine.module)
    student = {k.removeprefix("student."): v for k, v in whole.items() if k.startswith("student.")}
    return student, {k: v for k, v in whole.items() if not k.startswith("student.")}


def side_state(engine) -> dict[str, torch.Tensor]:
    """The side's weights for a checkpoint: ``copied_state`` with each tied tensor once (a collective under ZeRO-3)."""
    seen: set[int] = set()
    return {k: v for k, v in copied_state(engine.module).items() if not (id(v) in seen or seen.add(id(v)))}


# ZeRO's optimizer state that differs between processes and steps (stages 1-2, stage 3): the
# rest of its state_dict is layout (paddings, partition counts) rebuilt by the engine.
_PARTITION_KEYS = {
    False: ("base_optimizer_state", "single_partition_of_fp32_groups"),
    True: ("optimizer_state_dict", "fp32_flat_groups"),
}


def partition_state(engine) -> dict:
    """This process's ZeRO optimizer partition: AdamW's moments over it and its float32 master weights (tensors only);
    and the AdamW beside."""
    sd = engine.optimizer.state_dict()
    keys = _PARTITION_KEYS[is_stage3(engine)]
    return {**{k: sd[k] for k in keys}, "beside": engine.beside[0].state_dict() if engine.beside else None}


def load_partition_state(engine, saved: dict) -> None:
    """Restore a ``partition_state`` (same stage, groups and process count), after the model's weights were loaded.

    The master copy is copied in directly for stages 1-2 (DeepSpeed's own loader
    wants every process's partitions in each process); under ZeRO-3 the loader
    also sets the partitioned weights from it.
    """
    opt = engine.optimizer
    if is_stage3(engine):
        sd = opt.state_dict()
        sd.update({k: saved[k] for k in _PARTITION_KEYS[True]})
        opt._rigid_load_state_dict(sd, load_optimizer_states=True)
        # That set the partitions; the persistent parameters (small ones, and a kept-whole head) still
        # hold their old whole copies: release and gather them again, as DeepSpeed's own loader does.
        if held := opt.persistent_parameters:
            held[0].partition(held)
            held[0].all_gather(held)
    else:
        with torch.no_grad():
            for mine, theirs in zip(
                opt.single_partition_of_fp32_groups, saved["single_partition_of_fp32_groups"], strict=True
            ):
                mine.copy_(theirs)
        opt.optimizer.load_state_dict(saved["base_optimizer_state"])
    if engine.beside is not None:
        engine.beside[0].load_state_dict(saved["beside"])
