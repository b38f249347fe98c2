"""``alignkd cache-teacher``: run the teacher once over the training blocks and store what the run's terms read.

The teacher's top-k log-probabilities and tail mass, and the hidden states and
q/k/v projections that the config's feature terms map to, are written shard by
shard (``alignkd.teacher.cache_format``) into a hidden temporary folder, which is renamed
into place at the end: a kill leaves no half cache where a run would read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignkd.align.plan import build_plan, forward_record
from alignkd.align.tasks import TASKS, heldout
from alignkd.backend import make_accelerator
from alignkd.config import resolve_precision, resolved
from alignkd.disk import disk_errno, fix, why
from alignkd.display import Tasks
from alignkd.engine.block_choice import choose_blocks, choosing
from alignkd.engine.checkpoint import replace_dir
from alignkd.engine.load import load_models
from alignkd.errors import ConfigError, DiskError
from alignkd.models.capture import Capture, Needs
from alignkd.models.generate import top_logprobs
from alignkd.precision import DTYPES, default_device
from alignkd.teacher.cache_format import (
    META,
    VERSION,
    bytes_per_token,
    data_hash,
    hidden_key,
    qkv_key,
    shard_name,
    teacher_fingerprint,
)

# A shard holds about this many bytes, so a reader maps a few files, not thousands.
SHARD_BYTES = 256 << 20


def _check_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"teacher.cache {dest} is a file; choose a folder for the cache")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ConfigError(
            f"teacher.cache {dest} is not empty; pass --overwrite to replace it, or choose another folder"
        )
    near = next(p for p in (dest.absolute(), *dest.absolute().parents) if p.exists())
    if not os.access(near, os.W_OK | os.X_OK):
        raise ConfigError(
            f"teacher.cache {dest}: cannot write there ({near} is not writable); choose a writable folder"
        )


class _ShardWriter:
    """Buffers per-block tensors and writes a shard whenever ``rows`` blocks are buffered."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows = folder, rows
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.written = 0  # blocks in finished shards
        self.shards: list[dict] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            self.buffer.setdefault(key, []).append(t.cpu())
        self.buffered += next(iter(tensors.values())).shape[0]
        if self.buffered >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = shard_name(len(self.shards))
        save_file({k: torch.cat(v).contiguous() for k, v in self.buffer.items()}, str(self.folder / name))
        self.shards.append({"file": name, "start": self.written, "end": self.written + self.buffered})
        self.written += self.buffered
        self.buffer, self.buffered = {}, 0


def cache_teacher(cfg, *, overwrite: bool = False, say=print) -> dict:
    """Write the teacher cache of ``cfg`` into ``cfg.teacher.cache``; returns its ``meta.json`` content."""
    resolved(cfg)
    if not cfg.teacher.cache:
        raise ConfigError("teacher.cache: name the folder to write the cache to, e.g. teacher.cache=runs/teacher-cache")
    dest = Path(cfg.teacher.cache)
    _check_dest(dest, overwrite)
    device = default_device()
    precision = resolve_precision(cfg, device)
    task = TASKS[cfg.teacher.task]
    inputs = None
    if choosing(cfg):  # the run will choose its blocks: choose the same ones now, for its layer map
        _, inputs = choose_blocks(cfg, make_accelerator(cfg.train.mixed_precision), say)
    tok, teacher, needs, capture, vocab = _teacher_and_needs(cfg, inputs)
    train, held = (inputs.train_data, inputs.eval_data) if inputs else task.load_data(cfg, tok, say)
    blocks = train["input_ids"]
    n, seq_len = blocks.shape[0], blocks.shape[1]
    k = min(cfg.teacher.cache_top_k, vocab)
    stored = f", {len(needs.hidden)} hidden and {len(needs.qkv)} q/k/v layers in {cfg.teacher.cache_dtype}"
    say(
        f"{precision}; caching {n} blocks of {seq_len} tokens: top-{k} log-probabilities"
        + (stored if needs.hidden or needs.qkv else "")
    )
    teacher.to(device)
    tmp = dest.absolute().parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    bs = cfg.train.batch_size
    sizes: dict[str, int] = {}
    with _room(dest, tmp, sizes):
        tmp.mkdir(parents=True)
        shards, specs = _write_shards(
            teacher, capture, blocks, tmp, k, vocab, DTYPES[cfg.teacher.cache_dtype], bs, sizes
        )
    teacher_eval = heldout(
        task, teacher, held, tok, batch_size=bs, batches=cfg.train.eval_batches, device=device,
        autocast=contextlib.nullcontext,
    )  # fmt: skip
    meta = {
        **_meta(cfg, blocks, held["input_ids"], k, vocab),
        "tensors": specs,
        "shards": shards,
        "teacher_eval": teacher_eval,
        "teacher_eval_blocks": min(held["input_ids"].shape[0], bs * cfg.train.eval_batches),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with _room(dest, tmp, sizes):
        (tmp / META).write_text(json.dumps(meta, indent=1))  # last: a folder without it is not a cache
        replace_dir(tmp, dest)
    per = bytes_per_token(meta)
    total = sum((dest / s["file"]).stat().st_size for s in meta["shards"])
    say(
        f"teacher cache: {dest} ({total / 1e6:.1f} MB, {n * seq_len} tokens, {meta['seconds']:.0f} s); "
        "bytes per token: " + ", ".join(f"{key} {b}" for key, b in per.items())
    )
    return meta


def _meta(cfg, blocks, eval_blocks, k: int, vocab: int) -> dict:
    """What ``meta.json`` says of the data and the teacher, which a run checks before it reads the cache."""
    return {
        "version": VERSION,
        "blocks": blocks.shape[0],
        "seq_len": blocks.shape[1],
        "top_k": k,
        "vocab": vocab,
        "data_hash": data_hash(blocks, eval_blocks),
        "teacher": cfg.teacher.path,
        "teacher_fingerprint": teacher_fingerprint(cfg.teacher.path),
        "teacher_dtype": cfg.teacher.dtype,
        "bos": cfg.data.bos,
    }


def _teacher_and_needs(cfg, inputs):
    """The tokenizer, the teacher with hooks on what the run's terms read of it, those needs, and the vocabulary.

    The student is built only to resolve the terms' layer maps, as the run will.
    """
    tok, teacher, student, vocab = load_models(cfg, teacher_weights=True, inputs=inputs)
    needs = build_plan(cfg.losses, student, teacher).teacher_needs
    capture = Capture(teacher, Needs(hidden=needs.hidden, qkv=needs.qkv))
    return tok, teacher, needs, capture, vocab


@contextlib.contextmanager
def _room(dest: Path, tmp: Path, sizes: dict[str, int]):
    """Writes into ``tmp`` whose failure removes it; a full disk or an unwritable folder is one line."""
    try:
        yield
    except Exception as e:
        code = disk_errno(e, tmp, sizes.get("needed"))
        shutil.rmtree(tmp, ignore_errors=True)
        if code is None:
            raise
        where = tmp.parent
        raise DiskError(
            f"could not write the teacher cache to {dest}: {why(code, where, sizes.get('needed'))}; "
            f"{fix(code, where)}, then run alignkd cache-teacher again",
            code,
        ) from e


def _write_shards(teacher, capture, blocks, folder: Path, k: int, vocab: int, dtype, batch_size: int, sizes: dict):
    """Run the teacher over ``blocks`` ``[N, T]`` in batches and write its outputs shard by shard into ``folder``.

    Returns (the shards' entries for ``meta.json``, each stored tensor's dtype and per-block shape);
    ``sizes["needed"]``: the bytes the shards take, known from the first batch.
    """
    device = next(teacher.parameters()).device
    writer = None
    specs: dict[str, dict] = {}
    n = blocks.shape[0]
    with Tasks(bar=True) as shown, torch.inference_mode():
        for start in range(0, n, batch_size):
            ids = torch.as_tensor(blocks[start : start + batch_size]).to(device)
            rec = forward_record(teacher, capture, ids, torch.ones_like(ids, dtype=torch.bool), False)
            top = top_logprobs(rec.logits[..., :vocab], k)
            out = {"ids": top.ids, "logprobs": top.logprobs, "tail": top.tail}
            out.update({hidden_key(b): h.to(dtype) for b, h in rec.hidden.items()})
            out.update({qkv_key(b, p): x.to(dtype) for (b, p), x in rec.qkv.items()})
            if writer is None:  # the first batch tells the bytes per block
                per_block = sum(t[0].numel() * t.element_size() for t in out.values())
                sizes["needed"] = per_block * n
                writer = _ShardWriter(folder, max(1, SHARD_BYTES // per_block))
                specs = {
                    key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                    for key, t in out.items()
                }
            writer.add(out)
            done = min(start + batch_size, n)
            # Off a terminal a line prints when the text changes: one per tenth of the blocks, none before the first.
            tenth = 10 * (10 * done // n)
            text = f"{tenth}% of {n:,} blocks" if tenth else None
            shown.update("cache-teacher", text, done=done, total=n)
        writer.flush()
    return writer.shards, specs
