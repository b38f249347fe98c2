"""Forward hooks that record what the configured losses need, and nothing more.

A ``Record`` is the contract between models and losses: logits, block outputs,
attention probabilities and q/k/v projections, keyed by block index. Hooks are
registered once per model for the union of what all terms ask for, so a run
that maps two layers never asks the model for all its hidden states.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from alignkd.models.families import blocks_of, family_of, get_path


@dataclass
class Needs:
    """What one model must expose during its forward pass."""

    hidden: set[int] = field(default_factory=set)
    """Block indices whose outputs ``[B, T, D]`` are recorded."""
    attention: set[int] = field(default_factory=set)
    """Block indices whose attention probabilities ``[B, H, T, T]`` are recorded (needs eager attention)."""
    qkv: set[tuple[int, str]] = field(default_factory=set)
    """(block, 'q' | 'k' | 'v') projections ``[B, T, D_x]`` to record."""

    def merge(self, other: Needs) -> None:
        """Add what ``other`` asks for (hooks are registered once for the union of all terms)."""
        self.hidden |= other.hidden
        self.attention |= other.attention
        self.qkv |= other.qkv


@dataclass
class Record:
    """Tensors of one forward pass."""

    logits: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    """``[B, T, D]`` post-norm states, recorded instead of the logits when the run fuses the LM head."""
    topk_ids: torch.Tensor | None = None
    """Teacher from a cache: ``[B, T, k]`` its top-k token ids, instead of logits."""
    topk_logprobs: torch.Tensor | None = None
    """``[B, T, k]`` their log-probabilities (temperature 1)."""
    tail: torch.Tensor | None = None
    """``[B, T]`` log of the mass outside the top k (``-inf`` when none)."""
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class Capture:
    """Registers hooks on ``model`` for ``needs``; each forward fills ``self.record``."""

    def __init__(self, model: nn.Module, needs: Needs):
        self.record = Record()
        self.active = True
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        fam = family_of(model)
        blocks = blocks_of(model)
        n = len(blocks)
        for idx in sorted(needs.hidden | needs.attention | {i for i, _ in needs.qkv}):
            if not 0 <= idx < n:
                raise IndexError(f"block {idx} does not exist: the model has {n} blocks (0..{n - 1})")
        for idx in sorted(needs.hidden):
            self.handles.append(blocks[idx].register_forward_hook(self._save_hidden(idx)))
        for idx in sorted(needs.attention):
            attn = get_path(blocks[idx], fam.attention)
            self.handles.append(attn.register_forward_hook(self._save_attention(idx)))
        by_block: dict[int, set[str]] = {}
        for idx, part in needs.qkv:
            by_block.setdefault(idx, set()).add(part)
        for idx, parts in sorted(by_block.items()):
            if isinstance(fam.qkv, str):  # one fused projection: split its output in three
                mod = get_path(blocks[idx], fam.qkv)
                self.handles.append(mod.register_forward_hook(self._save_fused(idx, parts)))
            else:
                for part in sorted(parts):
                    mod = get_path(blocks[idx], fam.qkv["qkv".index(part)])
                    self.handles.append(mod.register_forward_hook(self._save_qkv(idx, part)))

    def _save_hidden(self, idx: int):
        def hook(module, args, output):
            if not self.active:
                return
            self.record.hidden[idx] = _first(output)

        return hook

    def _save_attention(self, idx: int):
        def hook(module, args, output):
            if not self.active:
                return
            probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if probs is None:
                raise RuntimeError(
                    "attention probabilities were not returned: the model must run with attn_implementation='eager'"
                )
            self.record.attention[idx] = probs

        return hook

    def _save_qkv(self, idx: int, part: str):
        def hook(module, args, output):
            if not self.active:
                return
            self.record.qkv[(idx, part)] = output

        return hook

    def _save_fused(self, idx: int, parts: set[str]):
        def hook(module, args, output):
            if not self.active:
                return
            for part, x in zip("qkv", output.chunk(3, dim=-1), strict=True):
                if part in parts:
                    self.record.qkv[(idx, part)] = x

        return hook

    @contextlib.contextmanager
    def paused(self):
        """Run forwards whose tensors must not be recorded (e.g. block-wise KD's extra teacher passes)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def take(self) -> Record:
        """Return the record of the last forward and start a fresh one."""
        rec, self.record = self.record, Record()
        return rec

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
