"""The teacher's sampled continuations, stored once and reused (sequence-level KD).

A store is a folder named by a digest of everything that decides a sample: the
teacher's files and dtype, the prompts, the sampling settings and the seed. Each
prompt's continuation is drawn from a seed of its own index, so a sample is the
same whichever batch, process or run draws it first, and a prompt is generated
only the first time a run needs it. Processes write their own part files
(renamed into place once whole); a store opened later reads every part.

A store may also keep the teacher's top-k log-probabilities behind each sampled
token (``generation.teacher_top_k``), so that training on the samples needs no
second teacher forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkd.models.generate import TopK

PAD = -1
"""Fills a stored row past its continuation's end."""


def sample_seed(seed: int, prompt: int) -> int:
    """The seed a prompt's teacher continuation is drawn with."""
    return (seed * 1_000_003 + prompt * 7_919 + 17) % (2**62)


def store_key(**parts) -> str:
    """A short digest of ``parts`` (JSON-able values): the store's folder name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class TeacherSamples:
    """Continuations by prompt index, in ``folder`` (made when first written)."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.rows: dict[int, torch.Tensor] = {}
        self.top: dict[int, TopK] = {}
        if folder.is_dir():
            for part in sorted(folder.glob("part-*.safetensors")):
                t = load_file(part)
                for r, (i, row) in enumerate(zip(t["index"].tolist(), t["tokens"], strict=True)):
                    n = int((row != PAD).sum())
                    self.rows[i] = row[:n].long()
                    if "top_ids" in t:
                        self.top[i] = TopK(t["top_ids"][r, :n], t["top_logprobs"][r, :n], t["top_tail"][r, :n])

    def __len__(self) -> int:
        return len(self.rows)

    def missing(self, prompts: list[int]) -> list[int]:
        return [i for i in prompts if i not in self.rows]

    def get(self, prompts: list[int]) -> list[torch.Tensor]:
        """Each prompt's continuation ``[n]`` (its EOS included when it stopped at one)."""
        return [self.rows[i] for i in prompts]

    def get_top(self, prompts: list[int]) -> list[TopK]:
        """The teacher's top-k behind each prompt's continuation tokens (``[n, k]``), where the store keeps them."""
        return [self.top[i] for i in prompts]

    def put(self, prompts: list[int], continuations: list[torch.Tensor], top: list[TopK] | None = None) -> None:
        """Keep and write new continuations, with the teacher's top-k behind their tokens if given (one part file)."""
        top = top if top is not None else [None] * len(prompts)
        new = [(i, c.cpu(), t) for i, c, t in zip(prompts, continuations, top, strict=True) if i not in self.rows]
        if not new:
            return
        width = max(1, max(len(c) for _, c, _ in new))
        tokens = torch.full((len(new), width), PAD, dtype=torch.int32)
        tensors = {}
        if new[0][2] is not None:
            k = new[0][2].ids.shape[-1]
            tensors = {
                "top_ids": torch.zeros(len(new), width, k, dtype=torch.int32),
                "top_logprobs": torch.zeros(len(new), width, k),
                "top_tail": torch.zeros(len(new), width),
            }
        for r, (i, c, t) in enumerate(new):
            tokens[r, : len(c)] = c.to(torch.int32)
            self.rows[i] = c.long()
            if t is not None:
                t = TopK(t.ids.cpu(), t.logprobs.float().cpu(), t.tail.float().cpu())
                for name, value in zip(tensors, (t.ids, t.logprobs, t.tail), strict=True):
                    tensors[name][r, : len(c)] = value
                self.top[i] = t
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.exists():
            tmp = self.folder / f".meta-{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(self.meta, indent=1))
            os.replace(tmp, meta)
        name = f"part-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"index": torch.tensor([i for i, _, _ in new]), "tokens": tokens, **tensors}, str(tmp))
        os.replace(tmp, self.folder / name)  # whole or absent: a run killed mid-write leaves no half part
