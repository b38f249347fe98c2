"""Building the student: from a path, from a subset of the teacher's blocks, or from a config."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from alignkd.errors import ConfigError, ModelError
from alignkd.models.adapters import add_adapters
from alignkd.models.depth import even_layers
from alignkd.models.families import blocks_of, family_of, get_path
from alignkd.models.loading import AUTO_CLASSES, load_model
from alignkd.models.width import activation_scores, width_prune
from alignkd.precision import DTYPES, resolve_student_dtype

if TYPE_CHECKING:  # config sits above models (see docs/architecture.md): only for the annotations
    from alignkd.config import StudentConfig


def _renumber(block: nn.Module, new_idx: int) -> None:
    # Blocks and their attention modules carry layer_idx for KV caches and
    # per-layer attention types; it must follow the block's new position.
    for mod in block.modules():
        if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
            mod.layer_idx = new_idx


def kept_count(num_teacher: int, num_layers: int | None) -> int:
    """How many blocks a student made from the teacher keeps: ``num_layers``, else a quarter of the teacher's (at least
    1)."""
    return num_layers if num_layers is not None else max(1, num_teacher // 4)


def depth_pruned(
    teacher: nn.Module, layers: list[int] | None, num_layers: int | None, *, share_weights: bool = False
) -> nn.Module:
    """A copy of ``teacher`` that keeps only the blocks ``layers`` (DistilBERT / Minitron depth pruning).

    Embeddings, final norm and head are copied with them. ``share_weights``: the
    copy holds the teacher's own tensors (modules and config are new, weights are
    not): a cheap view for scoring a removal, never one to train.
    """
    n = len(blocks_of(teacher))
    if layers is None:
        layers = even_layers(n, kept_count(n, num_layers))
    if not layers:
        raise ModelError("student.from_teacher.layers: list at least one teacher block")
    for i in layers:
        if not 0 <= i < n:
            raise ModelError(
                f"student.from_teacher.layers: block {i} does not exist; the teacher has {n} blocks (0..{n - 1})"
            )
    # deepcopy takes what the memo already holds as is: preset, the tensors are shared.
    memo = {id(t): t for t in itertools.chain(teacher.parameters(), teacher.buffers())} if share_weights else None
    student = copy.deepcopy(teacher, memo)
    fam = family_of(student)
    old = blocks_of(student)
    # A block listed twice gets its own copy, so the two are trained independently.
    new = nn.ModuleList([old[i] if layers.index(i) == j else copy.deepcopy(old[i]) for j, i in enumerate(layers)])
    for j, block in enumerate(new):
        _renumber(block, j)
    parent_path, _, attr = fam.blocks.rpartition(".")
    parent = get_path(student.base_model, parent_path) if parent_path else student.base_model
    setattr(parent, attr, new)
    cfg = student.config
    cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    if hasattr(cfg, "max_window_layers"):
        cfg.max_window_layers = min(cfg.max_window_layers, len(layers))
    # Kept on the object only (not in config.json): the "source" layer map reads it.
    student.alignkd_source_layers = list(layers)
    return student


def from_config(teacher: nn.Module, overrides: dict, task: str) -> nn.Module:
    """A randomly initialised model of the teacher's architecture with ``overrides`` applied."""
    base = teacher.config.to_dict()
    for key in overrides:
        if key not in base and not hasattr(teacher.config, key) and key != "head_dim":
            near = difflib.get_close_matches(key, list(base), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ModelError(f"student.config.{key}: the teacher's config has no such key{hint}")
    merged = {**base, **overrides}
    # Derived fields must be recomputed when what they derive from changes.
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        merged.pop("layer_types", None)
    # Recompute head_dim only where the teacher derives it (llama: hidden / heads);
    # families that set it on its own (gemma) keep the teacher's.
    if (
        ({"hidden_size", "num_attention_heads"} & set(overrides))
        and "head_dim" not in overrides
        and "head_dim" in base
        and base["head_dim"] == base["hidden_size"] // base["num_attention_heads"]
    ):
        merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
    cfg = type(teacher.config)(**{k: v for k, v in merged.items() if k not in ("transformers_version", "model_type")})
    return AUTO_CLASSES[task].from_config(cfg)


def build_student(
    cfg: StudentConfig, teacher: nn.Module, task: str, calibration: torch.Tensor | None = None
) -> nn.Module:
    """The trainable student, in ``cfg.dtype``, in train mode.

    ``calibration``: ``[N, T]`` token blocks a width-pruned student's channels are ranked on
    (``importance: activation``); None ranks them by weight norms.
    """
    if cfg.path is not None:
        student = load_model(cfg.path, task=task, dtype=resolve_student_dtype(cfg.dtype), what="student")
    elif cfg.from_teacher is not None:
        student = depth_pruned(teacher, cfg.from_teacher.layers, cfg.from_teacher.num_layers)
    else:
        student = from_config(teacher, cfg.config or {}, task)
        if cfg.init == "prune":
            width_prune(student, teacher, activation_scores(teacher, calibration) if calibration is not None else None)
    student.to(DTYPES[resolve_student_dtype(cfg.dtype)])
    for p in student.parameters():
        p.requires_grad_(True)
    freeze_matching(student, cfg.freeze)
    if cfg.peft is not None:
        add_adapters(student, cfg.peft)  # freezes the base: only the adapters train
    student.train()
    return student


def freeze_matching(model: nn.Module, patterns: list[str]) -> int:
    """Stop training the parameters whose name, or a module name above it, matches one of ``patterns`` (globs);
    returns how many values that freezes (a tied tensor once)."""
    if not patterns:
        return 0
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    params = dict(model.named_parameters(remove_duplicate=False))
    frozen: dict[int, nn.Parameter] = {}
    for pattern in patterns:
        hit = [n for n in names if any(fnmatch.fnmatchcase(part, pattern) for part in _prefixes(n))]
        if not hit:
            example = ", ".join(names[:2])
            raise ConfigError(
                f"student.freeze: {pattern!r} matches no parameter of the student; names look like {example} "
                "(a module name freezes everything in it)"
            )
        for n in hit:
            frozen[id(params[n])] = params[n]
    for p in frozen.values():
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


def _prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: the parameter and every module above it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def param_count(model: nn.Module) -> int:
    """The model's parameters, a tied tensor once: the one count every summary, ratio and table uses.

    Live, on the meta device (``to_meta``) or partitioned by DeepSpeed ZeRO-3 (an empty placeholder whose size is
    ``ds_numel``), the same model counts the same.
    """
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def to_meta(model: nn.Module) -> nn.Module:
    """Free ``model``'s weights and keep its structure. ``Module.to("meta")`` gives every module a parameter of its
    own, so a tied head would become a second matrix (and count twice); it is tied again here."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb is not None and head is not None and head.weight is emb.weight
    model.to("meta")
    if tied:
        head.weight = emb.weight
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Frozen teacher: no gradients, eval mode (no dropout)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
