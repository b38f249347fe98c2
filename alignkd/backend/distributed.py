"""Where the models live in a multi-process run: the Accelerator, the student whole or sharded, the teacher whole or sharded.

Under a DDP launch the student side is Accelerate's business
(``accelerator.prepare``: DDP over NCCL on GPUs, over gloo on CPUs). Under an
FSDP launch (``configs/accelerate/fsdp.yaml``) alignkd shards it itself with
FSDP2 (``shard_student``): each block's parameters, gradients and optimizer
state are split over the processes, while the embeddings, final norm, head,
projectors and mixtures stay whole on every process, their gradients averaged
like DDP's. The fused LM-head terms and the capture hooks then read whole
tensors, and a tied embedding stays tied. The teacher has no optimizer and is
never prepared; ``place_teacher`` puts it on the device whole
(``teacher.placement: replicate``) or splits it over the processes
(``shard``: its blocks with FSDP2, or under a DeepSpeed launch its weights
with ZeRO-3 inference). Under a DeepSpeed launch the student goes to a ZeRO
engine (``engine.zero``); the helpers below that take a ``run`` cover all three.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from torch import nn

from alignkd.backend import zero
from alignkd.errors import ConfigError
from alignkd.models.families import blocks_of
from alignkd.precision import default_device


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


FSDP_LAUNCH = "ACCELERATE_USE_FSDP"
"""Set by ``accelerate launch`` with an FSDP config: the run shards the student (``shard_student``)."""


def shards_student() -> bool:
    """Whether this process was launched to shard the student (an FSDP launch)."""
    return _flag(FSDP_LAUNCH)


def make_accelerator(mixed_precision: str) -> Accelerator:
    """This process's Accelerator; on a machine without GPUs, the processes of a launch form a gloo group.

    ``accelerate launch --cpu`` starts one process whatever ``--num_processes``
    says (Accelerate runs several CPU processes only under ``mpirun``), and
    ``accelerate launch --multi_gpu`` / ``torchrun`` on a machine without GPUs
    start N processes that Accelerate, unless told to use the CPU, runs as N
    independent single-process runs (each writing its own outputs). Passing
    ``cpu=True`` where the run's device is the CPU makes them one gloo group.

    Under an FSDP or DeepSpeed launch the Accelerator is built as for DDP (its
    plugins would wrap the whole side, head included, or step the optimizer inside
    backward); ``shard_student`` and ``engine.zero`` do that work.
    """
    zero.launch_stage()  # a DeepSpeed launch alignkd cannot run stops here, in one line
    if default_device().type == "cpu":
        # Where deepspeed is installed, transformers imports it to save a model; told the device, it
        # does not print its "unable to detect" warning on stdout.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hidden = {k: os.environ.pop(k) for k in (FSDP_LAUNCH, zero.DEEPSPEED_LAUNCH) if k in os.environ}
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=default_device().type == "cpu")
    finally:
        os.environ.update(hidden)


def place_teacher(teacher: nn.Module, accelerator: Accelerator, placement: str, say=print, keep_whole=()) -> nn.Module:
    """Put the frozen teacher on this process's device: whole (``replicate``) or split over the processes (``shard``).

    ``shard`` splits its blocks with FSDP2, or under a DeepSpeed launch all its
    weights with ZeRO-3 inference (``zero.shard_teacher``, which keeps
    ``keep_whole``, the fused head, whole); with one process it keeps the
    teacher whole: there is nothing to split it over. Its dtype is
    ``teacher.dtype`` either way (e.g. replicate in bfloat16).
    """
    if placement == "replicate" or accelerator.num_processes == 1:
        return teacher.to(accelerator.device)
    if settings := zero.launch_zero():
        return zero.shard_teacher(teacher.to(accelerator.device), settings, accelerator.num_processes, say, keep_whole)
    _shard_fsdp2(teacher, accelerator)
    say(
        f"teacher: blocks sharded over {accelerator.num_processes} processes with FSDP2 "
        f"({_local_params(teacher) / 1e6:.2f}M of {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters here)"
    )
    return teacher


def shard_student(side: nn.Module, accelerator: Accelerator, say=print) -> list[nn.Parameter]:
    """Split the student's blocks over the processes (FSDP2); returns the parameters left whole, whose gradients ``average_whole`` averages.

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
        f"({_local_params(side.student) / 1e6:.2f}M of {sum(p.numel() for p in side.student.parameters()) / 1e6:.2f}M parameters here)"
    )
    return whole


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor (a shard of a parameter split over the processes)."""
    return hasattr(p, "to_local")


@contextlib.contextmanager
def gradient_sync(run, sync: bool):
    """Average gradients over the processes in this backward (``sync``), or only accumulate them."""
    if zero.is_engine(run.side):  # the boundary is set with the backward (``backward``)
        yield
    elif run.whole_params is not None:  # sharded: FSDP2 reduce-scatters the blocks' gradients when told to
        run.side.set_requires_gradient_sync(sync)
        yield
    elif sync:
        yield
    else:
        with run.accelerator.no_sync(run.side):
            yield


def backward(run, loss: torch.Tensor, sync: bool) -> None:
    """Backward of one micro-batch's (already share-scaled) loss; ``sync``: the step's last micro-batch."""
    if zero.is_engine(run.side):
        zero.backward(run.side, loss, sync)
    else:
        run.accelerator.backward(loss)


@contextlib.contextmanager
def held_gathered(run):
    """Keep a sharded student's blocks gathered through extra backwards (GradNorm's one per term), freed by the step's own."""
    if run.whole_params is None:
        yield
        return
    run.side.set_reshard_after_backward(False, recurse=True)
    try:
        yield
    finally:
        run.side.set_reshard_after_backward(True, recurse=True)


def average_whole(run) -> None:
    """Average over processes the gradients that no wrapper averaged: the weighting's own, and under FSDP the whole parameters'."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return
    params = list(run.weighting.model_params()) + list(run.whole_params or [])
    for p in params:
        if p.grad is not None:
            p.grad.copy_(acc.reduce(p.grad, "mean"))


def clip_grad_norm(run, max_norm: float) -> float:
    """Clip the side's gradients to ``max_norm`` over all processes; returns the norm before clipping."""
    acc = run.accelerator
    if run.whole_params is None:
        return float(acc.clip_grad_norm_(run.side.parameters(), max_norm))
    acc.unscale_gradients()
    grads = [p.grad for p in run.side.parameters() if p.grad is not None]
    # Shards add up over the processes; whole gradients are already the same on each.
    local = sum((g.to_local().float().pow(2).sum() for g in grads if is_sharded(g)), torch.zeros((), device=acc.device))
    whole = sum((g.float().pow(2).sum() for g in grads if not is_sharded(g)), torch.zeros((), device=acc.device))
    norm = (acc.reduce(local, "sum") + whole).sqrt()
    coef = min(max_norm / (float(norm) + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)
    return float(norm)


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


def _shard_fsdp2(teacher: nn.Module, accelerator: Accelerator) -> None:
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
