"""What a teacher cache folder holds, and the fingerprints that tie it to its data and teacher.

A cache folder::

    meta.json              what is stored, for which data, teacher and k (written last)
    shard-00000.safetensors
    shard-00001.safetensors ...

Each shard holds consecutive training blocks ``[start, end)``; per block and
position it stores:

    ids        [n, T, k] int32    the teacher's top-k token ids (over the shared vocabulary)
    logprobs   [n, T, k] float32  their log-probabilities at temperature 1
    tail       [n, T]    float32  log of the teacher's remaining mass (-inf when k covers V)
    hidden.B   [n, T, D]          output of teacher block B (``teacher.cache_dtype``)
    qkv.B.P    [n, T, D_P]        teacher block B's q, k or v projection (relation terms)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

META = "meta.json"
VERSION = 1
LOGITS_KEYS = ("ids", "logprobs", "tail")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def hidden_key(block: int) -> str:
    return f"hidden.{block}"


def qkv_key(block: int, part: str) -> str:
    return f"qkv.{block}.{part}"


def needed_keys(needs) -> list[str]:
    """The cached tensors a run's teacher ``Needs`` read (besides the logits)."""
    return [hidden_key(b) for b in sorted(needs.hidden)] + [qkv_key(b, p) for b, p in sorted(needs.qkv)]


def data_hash(*blocks) -> str:
    """sha256 over tokenised data (``[N, T]`` block tensors, or anything sliceable like one), read in slices."""
    h = hashlib.sha256()
    for x in blocks:
        n = x.shape[0]
        h.update(f"{n}x{tuple(x.shape[1:])};".encode())
        for start in range(0, n, 4096):
            h.update(torch.as_tensor(x[start : start + 4096]).to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_digest(path: Path, h) -> None:
    """Name, size and the first and last MiB of a weights file: cheap, and changes when the weights do."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size};".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 1 << 20))
            h.update(f.read())


def teacher_fingerprint(path: str) -> str:
    """A digest of the teacher's files (config and weights) when they are local, else of its hub id.

    A hub id is looked up in the local Hugging Face cache first, so a cached
    snapshot is fingerprinted by its files like a folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not cached: only the id is known without the network
            return "hub:" + path
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
            _file_digest(f, h)
    return h.hexdigest()


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


def bytes_per_token(meta: dict) -> dict[str, int]:
    """Stored bytes per token: ``logits`` (ids, log-probabilities, tail) and each cached layer."""
    out = {"logits": 0}
    for key, spec in meta["tensors"].items():
        per_token = int(torch.tensor([], dtype=getattr(torch, spec["dtype"])).element_size())
        for d in spec["shape"][1:]:  # shape is [T, ...]: per token, the trailing dims
            per_token *= d
        if key in LOGITS_KEYS:
            out["logits"] += per_token
        else:
            out[key] = per_token
    return out
