"""Reading a teacher cache during a run: rows by block index, straight from the memory-mapped shards."""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from safetensors import safe_open

from alignkd.errors import ConfigError
from alignkd.models.capture import Needs, Record
from alignkd.teacher.cache_format import (
    META,
    VERSION,
    data_hash,
    hidden_key,
    needed_keys,
    qkv_key,
    read_meta,
    teacher_fingerprint,
)

REBUILD = "rebuild it with `alignkd cache-teacher CONFIG --overwrite` and this run's config"


class TeacherCache:
    """A cache folder opened for reading; :meth:`record` gives the teacher's side of a batch."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise ConfigError(
                f"teacher.cache {self.folder} holds no teacher cache (no {META}); "
                "build it first with `alignkd cache-teacher CONFIG`, or remove teacher.cache"
            )
        self.meta = read_meta(self.folder)
        if self.meta.get("version") != VERSION:
            raise ConfigError(
                f"teacher.cache {self.folder} has format version {self.meta.get('version')}, "
                f"this alignkd reads {VERSION}; {REBUILD}"
            )
        self.starts = [s["start"] for s in self.meta["shards"]]
        self._files: dict[int, object] = {}
        self.needs = Needs()
        """What the run's terms read besides the logits (set by :meth:`check`)."""

    def check(self, cfg, train_blocks, eval_blocks, needs: Needs, vocab: int) -> None:
        """One-line errors when the cache was built for other data, another teacher, vocabulary or layers; then reads
        ``needs``."""
        m, where = self.meta, f"teacher.cache {self.folder}"
        if data_hash(train_blocks, eval_blocks) != m["data_hash"]:
            raise ConfigError(
                f"{where} was built from other tokenised data (data.*, the tokenizer or data.bos differ); {REBUILD}"
            )
        if teacher_fingerprint(cfg.teacher.path) != m["teacher_fingerprint"]:
            raise ConfigError(
                f"{where} was built with another teacher ({m['teacher']}, not {cfg.teacher.path}); {REBUILD}"
            )
        if vocab != m["vocab"]:
            raise ConfigError(
                f"{where} holds a shared vocabulary of {m['vocab']} columns, this run has {vocab}; {REBUILD}"
            )
        missing = [k for k in needed_keys(needs) if k not in m["tensors"]]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}, which this run's feature terms map to; {REBUILD}")
        self.needs = needs

    def _file(self, shard: int):
        if shard not in self._files:  # opened once; safetensors maps the file and reads only what is sliced
            self._files[shard] = safe_open(str(self.folder / self.meta["shards"][shard]["file"]), framework="pt")
        return self._files[shard]

    def _rows(self, key: str, index: list[int]) -> torch.Tensor:
        out = []
        for i in index:
            shard = bisect.bisect_right(self.starts, i) - 1
            r = i - self.starts[shard]
            out.append(self._file(shard).get_slice(key)[r : r + 1])
        return torch.cat(out)

    def record(self, index: torch.Tensor, device) -> Record:
        """The teacher's Record for training blocks ``index`` ``[B]``: top-k ids ``[B, T, k]``, log-probabilities, tail
        ``[B, T]``, cached states."""
        idx = [int(i) for i in index]
        if idx and not 0 <= min(idx) <= max(idx) < self.meta["blocks"]:
            raise IndexError(f"block {max(idx)} is outside the cache's {self.meta['blocks']} blocks")
        rec = Record(
            topk_ids=self._rows("ids", idx).to(device),
            topk_logprobs=self._rows("logprobs", idx).to(device),
            tail=self._rows("tail", idx).to(device),
        )
        rec.hidden = {b: self._rows(hidden_key(b), idx).to(device) for b in sorted(self.needs.hidden)}
        rec.qkv = {(b, p): self._rows(qkv_key(b, p), idx).to(device) for b, p in sorted(self.needs.qkv)}
        return rec
