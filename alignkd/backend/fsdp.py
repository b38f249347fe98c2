"""FSDP2 for the student's blocks (an FSDP launch) and for a sharded teacher: sharding, and states as each process holds
them.

``shard_student`` splits each of the student's blocks over the processes, while
the embeddings, final norm, head, projectors and mixtures stay whole on every
process (their gradients averaged like DDP's), so the fused LM-head terms and
the capture hooks read whole tensors and a tied embedding stays tied.
``shard_teacher`` does the same to the frozen teacher's blocks.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from alignkd.errors import ConfigError
from alignkd.models.families import blocks_of


def shard_student(side: nn.Module, accelerator: Accelerator, say=print) -> list[nn.Parameter]:
    """Split the student's blocks over the processes (FSDP2); returns the parameters left whole, whose gradients
    ``average_whole`` averages.

    Call before the optimizer is built: sharding replaces the blocks' parameters.
    """
    fully_shard = _fully_shard("an FSDP launch", "launch with configs/accelerate/ddp.yaml")
    mesh = _mesh(accelerator)
    side.to(accelerator.device)
    blocks = blocks_of(side.student)
    in_blocks = {id(p) for p in blocks.parameters()}
    whole = [p for p in side.parameters() if id(p) not in in_blocks]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(side, mesh=mesh, reshard_after_forward=True, ignored_params=set(whole))
    # One forward through the root first: FSDP2 initialises from the module it first runs,
    # and an evaluation calls the student, not the root.
    ids = torch.zeros(1, 2, dtype=torch.long, device=accelerator.device)
    with torch.no_grad():
        side(ids, torch.ones_like(ids))
    say(
        f"student: blocks sharded over {accelerator.num_processes} processes with FSDP2 "
        f"({_local_params(side.student) / 1e6:.2f}M of "
        f"{sum(p.numel() for p in side.student.parameters()) / 1e6:.2f}M parameters here)"
    )
    return whole


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor (a shard of a parameter split over the processes)."""
    return hasattr(p, "to_local")


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shard gathered whole, on the CPU (a collective: every process calls it)."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu() for k, v in module.state_dict().items()}


def local_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as this process holds it: shards as local tensors, tied tensors once."""
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        t = v.to_local() if is_sharded(v) else v
        if t.numel() and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[k] = t.detach().contiguous().cpu()
    return out


def load_local_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a ``local_state`` back into ``module`` (same processes, same sharding)."""
    current = {k: v.to_local() if is_sharded(v) else v for k, v in module.state_dict().items()}
    loaded = {current[k].data_ptr() for k in state if k in current}
    with torch.no_grad():
        for k, t in current.items():
            if k in state:
                t.copy_(state[k])
            elif t.numel() and t.data_ptr() not in loaded:  # a tied tensor comes with its twin
                raise KeyError(f"{k} is missing from the checkpoint")


def local_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with the sharded parameters' states as this process's local tensors."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: v.to_local() if is_sharded(v) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return sd


def load_local_optimizer_state(optimizer, sd: dict) -> None:
    """Load a ``local_optimizer_state``: each sharded parameter's local states become its shards again."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in sd["state"].items():
        p = params[int(i)]
        if is_sharded(p):
            for k, v in st.items():
                if v.dim() > 0:  # the moments; "step" is a whole scalar
                    st[k] = DTensor.from_local(
                        v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
    optimizer.load_state_dict(sd)


def _fully_shard(what: str, instead: str):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(
            f"{what} needs FSDP2 (torch >= 2.6; this is {torch.__version__}); upgrade torch or {instead}"
        ) from None
    return fully_shard


def _mesh(accelerator: Accelerator):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(accelerator.device.type, (accelerator.num_processes,))


def _local_params(model: nn.Module) -> int:
    """Parameters held by this process (a DTensor's local shard)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def shard_teacher(teacher: nn.Module, accelerator: Accelerator, say=print) -> nn.Module:
    """Split each block's parameters over the processes; gather a block's just before it runs and free them after.

    Embeddings, the final norm and the head stay whole on every process (their
    Parameter objects unchanged): the fused LM-head terms read the head weight
    on every step, so a sharded head would be gathered whole per call anyway,
    and these are a few percent of a large model's parameters.
    """
    fully_shard = _fully_shard("teacher.placement: shard", "set teacher.placement: replicate")
    mesh = _mesh(accelerator)
    teacher.to(accelerator.device)
    blocks = blocks_of(teacher)
    in_blocks = {id(p) for p in blocks.parameters()}
    whole = {p for p in teacher.parameters() if id(p) not in in_blocks}
    for block in blocks:
        # Explicit True: a root FSDP module would otherwise keep its parameters gathered after forward.
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # One root over the blocks (shared communication state, one lazy init), owning no parameters itself.
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True, ignored_params=whole)
    _first_forward(teacher, accelerator.device)
    total = sum(p.numel() for p in teacher.parameters())
    say(
        f"teacher: blocks sharded over {accelerator.num_processes} processes with FSDP2 "
        f"({_local_params(teacher) / 1e6:.2f}M of {total / 1e6:.2f}M parameters here)"
    )
    return teacher


def _first_forward(teacher: nn.Module, device: torch.device) -> None:
    """Run one tiny forward outside inference mode, so FSDP2 allocates its gathered parameters as ordinary tensors.

    FSDP2 creates them on the first forward and reuses them. Created under
    ``torch.inference_mode`` (the training step's teacher forward) they are
    inference tensors, and a later forward under ``no_grad`` (evaluation) fails
    to copy into them. Every process runs it: it all-gathers.
    """
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        teacher(input_ids=ids, attention_mask=torch.ones_like(ids))
