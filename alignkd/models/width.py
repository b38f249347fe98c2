"""Width pruning: initialise a narrower student from the teacher's most important channels.

For llama-like families. The student (built from the teacher's config with a
smaller ``hidden_size``, ``intermediate_size``, head counts and/or fewer layers)
receives the teacher's weights restricted to the most important channels:

- hidden channels: L2 norm of the embedding column times the mean gain of the
  norms that scale that channel (a channel that is both large and amplified matters);
- attention: key/value heads by the norm of their k/v rows; within each kept group,
  query heads by the norm of their q rows and o_proj columns (head_dim is kept);
- MLP channels: product of the norms of the gate row, up row and down column.

Those are the ``weight`` scores, which need no data. The ``activation`` scores
(the default in a run) rank the same channels by what they carry on calibration
text, as Minitron does (Muralidharan et al., 2024): a hidden channel by the mean
magnitude of every norm's output in it, summed over the norms; a query head by
the mean L2 norm of its attention output (the input of ``o_proj``), a key/value
head by the sum over its query heads; an MLP channel by the mean magnitude of
the input of ``down_proj``. Blocks are taken evenly spread when the student has
fewer. A sequence classifier's ``score`` head keeps the same hidden channels.

:func:`even_layers` (which teacher blocks a shallower student keeps) lives here
too; depth pruning in :mod:`alignkd.models.student` uses it, never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignkd.errors import ModelError
from alignkd.models.depth import even_layers
from alignkd.models.families import FAMILIES, blocks_of

_LLAMA_TYPES = {k for k, v in FAMILIES.items() if v is FAMILIES["llama"]}


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


@dataclass
class Scores:
    """Channel importances of a teacher: higher keeps."""

    hidden: torch.Tensor
    """``[D]`` hidden (embedding) channels."""
    query_heads: list[torch.Tensor]
    """Per block, ``[H]`` query heads."""
    kv_heads: list[torch.Tensor]
    """Per block, ``[H_kv]`` key/value heads."""
    mlp: list[torch.Tensor]
    """Per block, ``[I]`` MLP channels."""


def weight_scores(teacher: nn.Module) -> Scores:
    """Importances from weight norms alone (no data): see the module docstring."""
    hd = _head_dim(teacher)
    emb = teacher.get_input_embeddings().weight.float()
    offset = 1.0 if _cfg(teacher, "model_type", "").startswith("gemma") else 0.0  # Gemma norms scale by (1 + weight)
    gains = [
        (m.weight.float() + offset).abs()
        for name, m in teacher.named_modules()
        if name.endswith("norm") and getattr(m, "weight", None) is not None and m.weight.shape == emb.shape[1:]
    ]
    gain = torch.stack(gains).mean(0) if gains else torch.ones(emb.shape[1])
    q, kv, mlp = [], [], []
    for block in blocks_of(teacher):
        a, m = block.self_attn, block.mlp
        kv.append(_heads(a.k_proj.weight, hd) + _heads(a.v_proj.weight, hd))
        q.append(_heads(a.q_proj.weight, hd) + _heads(a.o_proj.weight.T, hd))
        mlp.append(
            m.gate_proj.weight.float().norm(dim=1)
            * m.up_proj.weight.float().norm(dim=1)
            * m.down_proj.weight.float().norm(dim=0)
        )
    return Scores(emb.norm(dim=0) * gain, q, kv, mlp)


@torch.no_grad()
def activation_scores(teacher: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> Scores:
    """Importances from the teacher's activations on calibration blocks ``input_ids`` ``[N, T]`` (every position
    counted)."""
    hd, width = _head_dim(teacher), teacher.config.hidden_size
    groups = teacher.config.num_attention_heads // _cfg(
        teacher, "num_key_value_heads", teacher.config.num_attention_heads
    )
    blocks = blocks_of(teacher)
    hidden = torch.zeros(width)
    heads = [torch.zeros(teacher.config.num_attention_heads) for _ in blocks]
    mlp = [torch.zeros(b.mlp.down_proj.in_features) for b in blocks]
    tokens = 0

    def norm_out(module, args, out):
        nonlocal hidden
        hidden += out.detach().float().abs().reshape(-1, width).sum(0).cpu()

    def attn_in(i):
        def hook(module, args):
            x = args[0].detach().float()
            heads[i] += x.reshape(*x.shape[:-1], -1, hd).norm(dim=-1).reshape(-1, heads[i].numel()).sum(0).cpu()

        return hook

    def mlp_in(i):
        def hook(module, args):
            mlp[i] += args[0].detach().float().abs().reshape(-1, mlp[i].numel()).sum(0).cpu()

        return hook

    handles = [
        m.register_forward_hook(norm_out)
        for name, m in teacher.named_modules()
        if name.endswith("norm") and getattr(m, "weight", None) is not None and m.weight.shape == (width,)
    ]
    for i, b in enumerate(blocks):
        handles.append(b.self_attn.o_proj.register_forward_pre_hook(attn_in(i)))
        handles.append(b.mlp.down_proj.register_forward_pre_hook(mlp_in(i)))
    device = next(teacher.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = torch.as_tensor(input_ids[start : start + batch_size]).to(device)
            teacher.base_model(input_ids=ids)  # the head adds nothing to these scores
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    tokens = max(tokens, 1)
    kv = [(h / tokens).reshape(-1, groups).sum(1) for h in heads]
    return Scores(hidden / tokens, [h / tokens for h in heads], kv, [m / tokens for m in mlp])


@torch.no_grad()
def width_prune(student: nn.Module, teacher: nn.Module, scores: Scores | None = None) -> None:
    """Copy the teacher's most important channels into ``student`` in place (``scores``: default
    :func:`weight_scores`)."""
    hd = _prunable_head_dim(student, teacher)
    t_blocks, s_blocks = blocks_of(teacher), blocks_of(student)
    chosen = even_layers(len(t_blocks), len(s_blocks))
    t_group, s_kv, s_group = _head_groups(student, teacher)

    scores = scores if scores is not None else weight_scores(teacher)
    hid = _top(scores.hidden, student.config.hidden_size)

    _copy(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight, None, hid)
    if not student.config.tie_word_embeddings and student.get_output_embeddings() is not None:
        _copy(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight, None, hid)

    for s_block, t_idx in zip(s_blocks, chosen, strict=True):
        t_block = t_blocks[t_idx]
        q_keep, kv_keep = _kept_heads(scores, t_idx, t_group, s_kv, s_group)
        _prune_attention(s_block.self_attn, t_block.self_attn, q_keep, kv_keep, hid, hd)
        _prune_mlp(s_block.mlp, t_block.mlp, scores.mlp[t_idx], hid)
        for name, mod in t_block.named_children():
            if name.endswith("norm"):
                _copy(getattr(s_block, name).weight, mod.weight, hid)
    _prune_final_norm_and_score(student, teacher, hid)


def _prunable_head_dim(student: nn.Module, teacher: nn.Module) -> int:
    """Returns the head_dim teacher and student share, after checking both are the same llama-like family."""
    mt = _cfg(teacher, "model_type")
    if mt not in _LLAMA_TYPES or _cfg(student, "model_type") != mt:
        raise ModelError(
            f"student.init=prune supports llama-like models ({', '.join(sorted(_LLAMA_TYPES))}), not '{mt}'"
        )
    hd = _head_dim(teacher)
    if _head_dim(student) != hd:
        raise ModelError(
            f"student.init=prune keeps head_dim ({hd}); "
            f"set student.config.num_attention_heads = hidden_size / {hd} or head_dim: {hd}"
        )
    return hd


def _head_groups(student: nn.Module, teacher: nn.Module) -> tuple[int, int, int]:
    """Returns (teacher query heads per kv head, student kv heads, student query heads per kv head)."""
    t_heads, t_kv = (
        teacher.config.num_attention_heads,
        _cfg(teacher, "num_key_value_heads", teacher.config.num_attention_heads),
    )
    s_heads, s_kv = (
        student.config.num_attention_heads,
        _cfg(student, "num_key_value_heads", student.config.num_attention_heads),
    )
    t_group, s_group = t_heads // t_kv, s_heads // s_kv
    if s_kv > t_kv or s_group > t_group:
        raise ModelError(
            f"student.init=prune: the student needs at most {t_kv} key/value heads "
            f"and {t_group} query heads per key/value head"
        )
    return t_group, s_kv, s_group


def _copy(dst: torch.Tensor, src: torch.Tensor, *index: torch.Tensor | None) -> None:
    """Copy ``src``, narrowed to ``index[d]`` along each dim ``d`` (None: all), into ``dst``."""
    for dim, idx in enumerate(index):
        if idx is not None:
            src = src.index_select(dim, idx.to(src.device))
    if src.shape != dst.shape:
        raise ModelError(f"student.init=prune: cannot fit teacher weight {tuple(src.shape)} into {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


def _kept_heads(scores: Scores, t_idx: int, t_group: int, s_kv: int, s_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the teacher block's kept (query heads, key/value heads), the best query heads within each kept group."""
    kv_keep = _top(scores.kv_heads[t_idx], s_kv)
    q_score = scores.query_heads[t_idx]
    q_keep = torch.cat(
        [g * t_group + _top(q_score[g * t_group : (g + 1) * t_group], s_group) for g in kv_keep.tolist()]
    )
    return q_keep, kv_keep


def _prune_attention(
    sa: nn.Module, ta: nn.Module, q_keep: torch.Tensor, kv_keep: torch.Tensor, hid: torch.Tensor, hd: int
) -> None:
    """Copy the kept heads' projections, biases and per-head-dim norms from ``ta`` into ``sa``."""
    q_rows, kv_rows = _expand(q_keep, hd), _expand(kv_keep, hd)
    _copy(sa.q_proj.weight, ta.q_proj.weight, q_rows, hid)
    _copy(sa.k_proj.weight, ta.k_proj.weight, kv_rows, hid)
    _copy(sa.v_proj.weight, ta.v_proj.weight, kv_rows, hid)
    _copy(sa.o_proj.weight, ta.o_proj.weight, hid, q_rows)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        if getattr(getattr(ta, name), "bias", None) is not None:
            _copy(getattr(sa, name).bias, getattr(ta, name).bias, rows)
    for name in ("q_norm", "k_norm"):  # per-head-dim norms (qwen3, gemma3): unchanged
        if hasattr(ta, name):
            _copy(getattr(sa, name).weight, getattr(ta, name).weight)


def _prune_mlp(sm: nn.Module, tm: nn.Module, score: torch.Tensor, hid: torch.Tensor) -> None:
    """Copy the MLP channels of ``tm`` with the highest ``score`` into ``sm``."""
    keep = _top(score, sm.gate_proj.weight.shape[0])
    _copy(sm.gate_proj.weight, tm.gate_proj.weight, keep, hid)
    _copy(sm.up_proj.weight, tm.up_proj.weight, keep, hid)
    _copy(sm.down_proj.weight, tm.down_proj.weight, hid, keep)


def _prune_final_norm_and_score(student: nn.Module, teacher: nn.Module, hid: torch.Tensor) -> None:
    """Copy the final norm and a sequence classifier's ``score`` head at the kept hidden channels."""
    final = [m for n, m in teacher.base_model.named_children() if n == "norm"]
    if final:
        _copy(student.base_model.norm.weight, final[0].weight, hid)
    # A sequence classifier's head (``score``, [num_labels, hidden]) reads the same hidden channels.
    t_score, s_score = getattr(teacher, "score", None), getattr(student, "score", None)
    if isinstance(t_score, nn.Linear) and isinstance(s_score, nn.Linear):
        _copy(s_score.weight, t_score.weight, None, hid)
        if t_score.bias is not None and s_score.bias is not None:
            _copy(s_score.bias, t_score.bias)
