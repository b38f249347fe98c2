"""DeepSpeed ZeRO (stages 1 and 2) for the student under a DeepSpeed launch (``configs/accelerate/deepspeed.yaml``).

alignkd runs DeepSpeed's engine itself rather than through Accelerate's
plugin, whose ``backward`` also steps the optimizer, before alignkd's
accumulation, clipping and non-finite checks could see the gradients. Here each
micro-batch's backward goes through the engine with the accumulation boundary
set by the loop (``backward``); ZeRO reduces the gradients into each process's
partition, clips over all of them and skips a step whose gradient norm is not
finite (``step``); the loop reads the norm afterwards. The student's weights stay
whole on every process (stages 1 and 2 partition only the optimizer state and
the gradients), so the fused LM-head terms, the capture hooks and saving work
as in one process. The learned-weighting parameters ride in the same ZeRO
optimizer. Stage 3 would partition the weights too: the FSDP launch does that.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from alignkd.errors import ConfigError

DEEPSPEED_LAUNCH = "ACCELERATE_USE_DEEPSPEED"
"""Set by ``accelerate launch`` with a DeepSpeed config."""


def _env(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def launch_stage() -> int | None:
    """The ZeRO stage this process was launched with (None: not a DeepSpeed launch); refuses what alignkd cannot run.

    Reads Accelerate's ``deepspeed_config`` (``zero_stage``, the offload devices)
    or the ``zero_optimization`` section of its ``deepspeed_config_file``.
    """
    if _env(DEEPSPEED_LAUNCH) not in ("1", "true", "yes"):
        return None
    stage, offload = _env("ACCELERATE_DEEPSPEED_ZERO_STAGE"), {
        _env("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"), _env("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
    }
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if path and path.lower() != "none":
        try:
            zero = json.loads(open(path).read()).get("zero_optimization", {})
        except (OSError, ValueError) as e:
            raise ConfigError(f"accelerate launch: deepspeed_config_file {path} cannot be read ({e}); fix the path or the JSON") from None
        stage = str(zero.get("stage", stage or 0))
        offload |= {str(zero.get(k, {}).get("device", "none")).lower() for k in ("offload_optimizer", "offload_param")}
    if stage not in ("1", "2"):
        raise ConfigError(
            f"accelerate launch: DeepSpeed ZeRO stage {stage or '?'} is not supported for the student; set zero_stage: 1 or 2 "
            "(configs/accelerate/deepspeed.yaml), or launch with configs/accelerate/fsdp.yaml to shard the student's weights"
        )
    if offload - {"", "none"}:
        raise ConfigError(
            "accelerate launch: DeepSpeed offload is not supported; set offload_optimizer_device and offload_param_device to none"
        )
    return int(stage)


def wrap(side: nn.Module, optimizer: torch.optim.Optimizer, stage: int, cfg, num_processes: int):
    """Hand ``side`` and its AdamW to a DeepSpeed engine with ZeRO ``stage``; returns the engine (``engine.optimizer`` is ZeRO's).

    The AdamW's param groups stay the ones ZeRO steps, so an LR scheduler built on
    it keeps working. Parameters of the AdamW outside ``side`` (a learned
    weighting's) move to a small AdamW of their own (``engine.beside``), stepped
    with ZeRO's at the same learning rate. Weights in bfloat16 or float16 get
    DeepSpeed's float32 master copy.
    """
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("a DeepSpeed launch needs deepspeed: pip install deepspeed (or launch with configs/accelerate/fsdp.yaml)") from None
    t = cfg.train
    if t.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision: fp16 under a DeepSpeed launch is not supported (its loss scaling would bypass ZeRO); use bf16 or no")
    dtype = next(side.parameters()).dtype
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * num_processes,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": {"stage": stage},
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
    return engine


def _split_off(optimizer: torch.optim.Optimizer, inside: set[int]) -> tuple[torch.optim.Optimizer, list[int]] | None:
    """Move the parameters not in ``inside`` out of ``optimizer``'s groups into a new AdamW; returns it and, per its group, the source group's index."""
    groups, sources = [], []
    for i, g in enumerate(optimizer.param_groups):
        out = [p for p in g["params"] if id(p) not in inside]
        if out:
            g["params"] = [p for p in g["params"] if id(p) in inside]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": out})
            sources.append(i)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not groups:
        return None
    return torch.optim.AdamW(groups), sources


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
    """Clip and apply the optimizer step over every process's partition; returns (gradient norm before clipping, applied).

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
            for g, i in zip(beside.param_groups, sources):
                g["lr"] = engine.optimizer.param_groups[i]["lr"]
            beside.step()
        beside.zero_grad(set_to_none=True)
    return norm, applied


def copied_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` copied out of ZeRO's flat buffers (its parameters are views of them), on the CPU; tied tensors stay one."""
    copies: dict[int, torch.Tensor] = {}
    return {k: copies.setdefault(id(v), v.detach().cpu().clone()) for k, v in module.state_dict(keep_vars=True).items()}


# ZeRO's optimizer state that differs between processes and steps: the rest of
# its state_dict is layout (paddings, partition counts) rebuilt by the engine.
_PARTITION_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups")


def partition_state(engine) -> dict:
    """This process's ZeRO optimizer partition: AdamW's moments over it and its float32 master weights (tensors only); and the AdamW beside."""
    sd = engine.optimizer.state_dict()
    return {**{k: sd[k] for k in _PARTITION_KEYS}, "beside": engine.beside[0].state_dict() if engine.beside else None}


def load_partition_state(engine, saved: dict) -> None:
    """Restore a ``partition_state`` (same stage, groups and process count), after the model's weights were loaded.

    Copied in directly: DeepSpeed's own loader wants every process's partitions in each process.
    """
    opt = engine.optimizer
    with torch.no_grad():
        for mine, theirs in zip(opt.single_partition_of_fp32_groups, saved["single_partition_of_fp32_groups"], strict=True):
            mine.copy_(theirs)
    opt.optimizer.load_state_dict(saved["base_optimizer_state"])
    if engine.beside is not None:
        engine.beside[0].load_state_dict(saved["beside"])
