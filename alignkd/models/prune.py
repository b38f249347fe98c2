"""Width pruning: initialise a narrower student from the teacher by weight importance.

For llama-like families. The student (built from the teacher's config with a
smaller ``hidden_size``, ``intermediate_size``, head counts and/or fewer layers)
receives the teacher's weights restricted to the most important channels:

- hidden channels: L2 norm of the embedding column times the mean gain of the
  norms that scale that channel (a channel that is both large and amplified matters);
- attention: key/value heads by the norm of their k/v rows; within each kept group,
  query heads by the norm of their q rows and o_proj columns (head_dim is kept);
- MLP channels: product of the norms of the gate row, up row and down column.

Blocks are taken evenly spread when the student has fewer. This follows the
Minitron recipe in spirit (Muralidharan et al., 2024) with weight magnitudes
instead of activations, so it needs no calibration data.

:func:`even_layers` (which teacher blocks a shallower student keeps) lives here
too; depth pruning in :mod:`alignkd.models.student` uses it, never the other way.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkd.errors import ModelError
from alignkd.models.families import FAMILIES, blocks_of

_LLAMA_TYPES = {k for k, v in FAMILIES.items() if v is FAMILIES["llama"]}


def even_layers(num_teacher: int, num_student: int) -> list[int]:
    """``num_student`` teacher block indices spread evenly from the first to the last."""
    if not 1 <= num_student <= num_teacher:
        raise ModelError(f"student.from_teacher.num_layers: must be between 1 and {num_teacher}, got {num_student}")
    if num_student == 1:
        return [0]
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]


def _cfg(model, name, default=None):
    return getattr(model.config, name, default)


def _head_dim(model) -> int:
    return _cfg(model, "head_dim") or model.config.hidden_size // model.config.num_attention_heads


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order (keeps channel order)."""
    return scores.topk(k).indices.sort().values


def _heads(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[H * head_dim, ...]`` -> per-head L2 norms ``[H]``."""
    return rows.float().reshape(-1, head_dim, *rows.shape[1:]).flatten(1).norm(dim=1)


def _expand(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head indices -> row indices of a ``[H * head_dim, ...]`` projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def width_prune(student: nn.Module, teacher: nn.Module) -> None:
    """Copy the teacher's most important channels into ``student`` in place."""
    mt = _cfg(teacher, "model_type")
    if mt not in _LLAMA_TYPES or _cfg(student, "model_type") != mt:
        raise ModelError(f"student.init=prune supports llama-like models ({', '.join(sorted(_LLAMA_TYPES))}), not '{mt}'")
    hd = _head_dim(teacher)
    if _head_dim(student) != hd:
        raise ModelError(
            f"student.init=prune keeps head_dim ({hd}); set student.config.num_attention_heads = hidden_size / {hd} or head_dim: {hd}"
        )
    t_blocks, s_blocks = blocks_of(teacher), blocks_of(student)
    chosen = even_layers(len(t_blocks), len(s_blocks))
    t_heads, t_kv = teacher.config.num_attention_heads, _cfg(teacher, "num_key_value_heads", teacher.config.num_attention_heads)
    s_heads, s_kv = student.config.num_attention_heads, _cfg(student, "num_key_value_heads", student.config.num_attention_heads)
    t_group, s_group = t_heads // t_kv, s_heads // s_kv
    if s_kv > t_kv or s_group > t_group:
        raise ModelError(
            f"student.init=prune: the student needs at most {t_kv} key/value heads and {t_group} query heads per key/value head"
        )

    emb = teacher.get_input_embeddings().weight.float()
    offset = 1.0 if mt.startswith("gemma") else 0.0  # Gemma norms scale by (1 + weight)
    gains = [
        (m.weight.float() + offset).abs()
        for name, m in teacher.named_modules()
        if name.endswith("norm") and getattr(m, "weight", None) is not None and m.weight.shape == emb.shape[1:]
    ]
    gain = torch.stack(gains).mean(0) if gains else torch.ones(emb.shape[1])
    hid = _top(emb.norm(dim=0) * gain, student.config.hidden_size)

    def copy(dst: torch.Tensor, src: torch.Tensor, *index: torch.Tensor | None) -> None:
        for dim, idx in enumerate(index):
            if idx is not None:
                src = src.index_select(dim, idx.to(src.device))
        if src.shape != dst.shape:
            raise ModelError(f"student.init=prune: cannot fit teacher weight {tuple(src.shape)} into {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))

    copy(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight, None, hid)
    if not student.config.tie_word_embeddings and student.get_output_embeddings() is not None:
        copy(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight, None, hid)

    for s_block, t_idx in zip(s_blocks, chosen):
        t_block = t_blocks[t_idx]
        ta, sa = t_block.self_attn, s_block.self_attn
        kv_score = _heads(ta.k_proj.weight, hd) + _heads(ta.v_proj.weight, hd)
        kv_keep = _top(kv_score, s_kv)
        q_score = _heads(ta.q_proj.weight, hd) + _heads(ta.o_proj.weight.T, hd)
        q_keep = torch.cat([g * t_group + _top(q_score[g * t_group : (g + 1) * t_group], s_group) for g in kv_keep.tolist()])
        q_rows, kv_rows = _expand(q_keep, hd), _expand(kv_keep, hd)
        copy(sa.q_proj.weight, ta.q_proj.weight, q_rows, hid)
        copy(sa.k_proj.weight, ta.k_proj.weight, kv_rows, hid)
        copy(sa.v_proj.weight, ta.v_proj.weight, kv_rows, hid)
        copy(sa.o_proj.weight, ta.o_proj.weight, hid, q_rows)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if getattr(getattr(ta, name), "bias", None) is not None:
                copy(getattr(sa, name).bias, getattr(ta, name).bias, rows)
        for name in ("q_norm", "k_norm"):  # per-head-dim norms (qwen3, gemma3): unchanged
            if hasattr(ta, name):
                copy(getattr(sa, name).weight, getattr(ta, name).weight)
        tm, sm = t_block.mlp, s_block.mlp
        mlp_score = tm.gate_proj.weight.float().norm(dim=1) * tm.up_proj.weight.float().norm(dim=1) * tm.down_proj.weight.float().norm(dim=0)
        keep = _top(mlp_score, sm.gate_proj.weight.shape[0])
        copy(sm.gate_proj.weight, tm.gate_proj.weight, keep, hid)
        copy(sm.up_proj.weight, tm.up_proj.weight, keep, hid)
        copy(sm.down_proj.weight, tm.down_proj.weight, hid, keep)
        for name, mod in t_block.named_children():
            if name.endswith("norm"):
                copy(getattr(s_block, name).weight, mod.weight, hid)
    final = [m for n, m in teacher.base_model.named_children() if n == "norm"]
    if final:
        copy(student.base_model.norm.weight, final[0].weight, hid)
