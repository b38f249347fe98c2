"""Where the models live in a multi-process run: the Accelerator, and the frozen teacher whole or sharded.

The student side is Accelerate's business (``accelerator.prepare``: DDP over
NCCL on GPUs, over gloo on CPUs). The teacher has no optimizer
and is never prepared; ``place_teacher`` puts it on the device whole
(``teacher.placement: replicate``) or splits its blocks over the processes
(``shard``, FSDP2 ``fully_shard``).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from torch import nn

from alignkd.errors import ConfigError
from alignkd.models.families import blocks_of
from alignkd.precision import default_device

PLACEMENTS = ("replicate", "shard")
"""Values of ``teacher.placement``."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# Launch modes that shard the student, and why a run refuses them for now: it would
# otherwise hang or write a wrong student at the first save, not fail up front.
UNSUPPORTED_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP for the student is not supported yet (the student and checkpoints are saved "
    "from whole parameters on the main process)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed is not supported yet (its engine steps the optimizer inside backward, "
    "before alignkd's accumulation, clipping and non-finite checks)",
}


def make_accelerator(mixed_precision: str) -> Accelerator:
    """This process's Accelerator; on a machine without GPUs, the processes of a launch form a gloo group.

    ``accelerate launch --cpu`` starts one process whatever ``--num_processes``
    says (Accelerate runs several CPU processes only under ``mpirun``), and
    ``accelerate launch --multi_gpu`` / ``torchrun`` on a machine without GPUs
    start N processes that Accelerate, unless told to use the CPU, runs as N
    independent single-process runs (each writing its own outputs). Passing
    ``cpu=True`` where the run's device is the CPU makes them one gloo group.
    """
    for env, why in UNSUPPORTED_LAUNCHES.items():
        if _flag(env):
            raise ConfigError(
                f"accelerate launch: {why}; launch with --config_file configs/accelerate/ddp.yaml "
                "and set teacher.placement: shard to split the teacher over the processes"
            )
    return Accelerator(mixed_precision=mixed_precision, cpu=default_device().type == "cpu")


def place_teacher(teacher: nn.Module, accelerator: Accelerator, placement: str, say=print) -> nn.Module:
    """Put the frozen teacher on this process's device: whole (``replicate``) or its blocks split over the processes (``shard``).

    With one process ``shard`` keeps the teacher whole: there is nothing to split it over.
    Its dtype is ``teacher.dtype`` either way (e.g. replicate in bfloat16).
    """
    if placement == "replicate" or accelerator.num_processes == 1:
        return teacher.to(accelerator.device)
    _shard_fsdp2(teacher, accelerator)
    say(
        f"teacher: blocks sharded over {accelerator.num_processes} processes with FSDP2 "
        f"({_local_params(teacher) / 1e6:.2f}M of {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters here)"
    )
    return teacher


def _local_params(model: nn.Module) -> int:
    """Parameters held by this process (a DTensor's local shard)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def _shard_fsdp2(teacher: nn.Module, accelerator: Accelerator) -> None:
    """Split each block's parameters over the processes; gather a block's just before it runs and free them after.

    Embeddings, the final norm and the head stay whole on every process (their
    Parameter objects unchanged): the fused LM-head terms read the head weight
    on every step, so a sharded head would be gathered whole per call anyway,
    and these are a few percent of a large model's parameters.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(
            f"teacher.placement: shard needs FSDP2 (torch >= 2.6; this is {torch.__version__}); "
            "upgrade torch or set teacher.placement: replicate"
        ) from None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
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
