"""Where the parts of each model family live: blocks, attention, q/k/v, final norm.

Paths are dotted attribute paths. ``blocks`` and ``final_norm`` start at the
model's ``base_model`` (``LlamaModel``, ``GPT2Model``, ``BertModel``, ...);
``attention`` and ``q``/``k``/``v`` start at one block. This is the only place
that knows module names; hooks and students go through it, losses never do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignkd.errors import FamilyError
from alignkd.models.adapters import head_parts, lora_parts


@dataclass(frozen=True)
class Family:
    blocks: str
    """ModuleList of transformer blocks, from base_model."""
    attention: str
    """Self-attention module of a block; its forward returns (output, probabilities or None)."""
    qkv: tuple[str, str, str] | str
    """Query, key and value projections of a block, or one fused projection split in three."""
    final_norm: str | None
    """Norm after the last block, from base_model (None when the family has none)."""


_LLAMA_LIKE = Family(
    blocks="layers",
    attention="self_attn",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    final_norm="norm",
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": Family(blocks="h", attention="attn", qkv="attn.c_attn", final_norm="ln_f"),
    "bert": Family(
        blocks="encoder.layer",
        attention="attention.self",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        final_norm=None,
    ),
}


# Causal LMs whose logits are exactly head(base_model(...)[0]), capped by
# config.final_logit_softcapping when set: the fused LM-head losses may then
# skip the logits. Others (extra logit scaling, unknown layouts) keep them.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "gpt2"}


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head, for losses computed from the final hidden states."""

    weight: torch.Tensor
    """``[V, D]`` (the input embedding when tied)."""
    bias: torch.Tensor | None
    softcap: float | None
    """Logits = softcap * tanh(logits / softcap) when set (Gemma-2/3)."""
    adapter: nn.Module | None = None
    """A LoRA layer on the head (``student.peft``): ``weight`` is then its frozen base."""

    def lora(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The adapter's ``(A [r, D], B [V, r], scaling)`` for the fused losses' ``student_lora`` (None without):
        they add its update per block of rows, so the adapter trains and is never left out."""
        if self.adapter is None:
            return None
        parts = lora_parts(self.adapter)
        if parts is None:  # never the base alone: that would train as if the adapter were not there
            raise FamilyError(
                "the output head's adapter is no longer base + scale * B @ A (dropout on while training, DoRA or "
                "another active adapter), which the fused LM head needs; set train.fused_head: false"
            )
        return parts

    def params(self) -> list[torch.Tensor]:
        """The weight, and the bias when there is one."""
        return [p for p in (self.weight, self.bias) if p is not None]


def output_head(model: nn.Module) -> OutputHead | None:
    """The head, when the family's logits are a plain function of the base model's last hidden states; else None."""
    if getattr(model.config, "model_type", "") not in PLAIN_HEAD:
        return None
    parts = head_parts(model.get_output_embeddings())  # a plain nn.Linear, or one with a LoRA adapter
    if parts is None:
        return None
    base, adapter = parts
    return OutputHead(base.weight, base.bias, getattr(model.config, "final_logit_softcapping", None), adapter)


def get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            # e.g. GPT-NeoX read with llama's layout: its blocks exist, its q/k/v are elsewhere.
            raise FamilyError(
                f"{type(root).__name__} has no '{path}': alignkd does not know this model's layout "
                f"(known families: {', '.join(sorted(FAMILIES))}); use terms that need only logits and "
                "block outputs (kl, dkd, ce, hidden, contrastive)"
            ) from None
    return obj


def family_of(model: nn.Module) -> Family:
    """The Family of a transformers model, by ``config.model_type``."""
    model_type = getattr(model.config, "model_type", "")
    fam = FAMILIES.get(model_type)
    if fam is None:
        # Unknown type: many decoder models follow the llama layout, so try it.
        try:
            get_path(model.base_model, _LLAMA_LIKE.blocks)
            fam = _LLAMA_LIKE
        except FamilyError:
            raise FamilyError(
                f"model type '{model_type}' is not supported yet: known families are {', '.join(sorted(FAMILIES))}"
            ) from None
    return fam


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks."""
    return get_path(model.base_model, family_of(model).blocks)


def final_norm_of(model: nn.Module) -> nn.Module | None:
    """The norm after the last block (the one before the LM head); None when the family has none."""
    path = family_of(model).final_norm
    return get_path(model.base_model, path) if path is not None else None


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.n_embd


def num_heads_of(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "num_attention_heads", None) or cfg.n_head


def disable_attention_dropout(model: nn.Module) -> None:
    """Set attention-probability dropout to 0 in every block.

    Eager attention returns its probabilities after dropout; an attention loss on
    those would compare the teacher against randomly zeroed maps.
    """
    fam = family_of(model)
    for block in blocks_of(model):
        attn = get_path(block, fam.attention)
        for mod in attn.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
            for name, value in list(vars(mod).items()):
                if "dropout" in name and isinstance(value, float):
                    setattr(mod, name, 0.0)
