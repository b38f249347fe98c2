"""Documents -> one flat int32 token stream (EOS after each document), in memory or in a cache file reused by later
runs.

The stream holds no BOS and does not depend on ``seq_len``: packing reads it
(:class:`~alignkd.data.blocks.Blocks`). A cache file sits beside the data in
``.alignkd-tokens/`` (or under ``$ALIGNKD_CACHE/tokens`` when that folder is
not writable), named by a hash of everything the ids depend on: the tokenizer
(its full definition and special tokens), the separator id, ``text_field``, and
each file's path, size and modification time. A change to any of them makes a
new file and removes the old one. Files are written under a temporary name and
renamed into place, with the metadata written last, so a half-written cache is
never read; a lock lets one process tokenise while the others (ranks of one
run) wait and then reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from alignkd.data.files import TEXT_PIECE_CHARS, WHOLE_TEXT_BYTES
from alignkd.errors import DataError

FORMAT = 1  # bump when what a cache file holds changes, so older files are never read
CACHE_FOLDER = ".alignkd-tokens"
# data.token_cache = auto caches a source whose files hold at least this many bytes;
# smaller ones are tokenised in memory each run (seconds), leaving no files beside them.
AUTO_MIN_BYTES = 16 << 20
DISK_DTYPE = np.dtype("<i4")  # ids on disk: 4 bytes each, little-endian everywhere
BATCH_DOCS, BATCH_CHARS = 1000, 1 << 20  # text per tokenizer call (its encodings cost ~100 B a token)
FLUSH_TOKENS = 1 << 18  # ids held in memory before they are written out (1 MiB)


def _check_vocab(tokenizer) -> None:
    if len(tokenizer) > np.iinfo(np.int32).max:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens, more than int32 token files hold; set data.token_cache to off"
        )


def wants_cache(files: list[Path] | None, setting: str) -> bool:
    """Whether a source of ``files`` (None: a ``datasets`` source, never cached) goes through a cache file."""
    if files is None or setting == "off":
        return False
    return setting != "auto" or sum(f.stat().st_size for f in files) >= AUTO_MIN_BYTES


def tokenize_stream(
    pieces: Iterable[tuple[str, bool]],
    tokenizer,
    eos_id: int | None,
    write: Callable[[array], None],
    max_tokens: int | None = None,
) -> tuple[int, bool]:
    """Tokenise ``(text, ends_document)`` pieces in batches and hand the ids to ``write`` as int32 arrays.

    EOS follows each document that has tokens. Stops once ``max_tokens`` ids are
    written (the stream is then a prefix of the whole one). Returns (ids written,
    whether every piece was read).
    """
    _check_vocab(tokenizer)
    texts: list[str] = []
    ends: list[bool] = []
    out, total, in_doc, chars = array("i"), 0, 0, 0  # in_doc: ids of the current document so far
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
            in_doc = _encode(texts, ends, tokenizer, eos_id, out, in_doc)
            texts, ends, chars = [], [], 0
        if len(out) >= FLUSH_TOKENS or (max_tokens is not None and total + len(out) >= max_tokens):
            total += len(out)
            write(out)
            out = array("i")
            if max_tokens is not None and total >= max_tokens:
                return total, False
    _encode(texts, ends, tokenizer, eos_id, out, in_doc)
    write(out)
    return total + len(out), True


def _encode(texts: list[str], ends: list[bool], tokenizer, eos_id: int | None, out: array, in_doc: int) -> int:
    if not texts:
        return in_doc
    # verbose=False: documents longer than model_max_length are expected here.
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    for doc, end in zip(ids, ends, strict=True):
        out.extend(doc)
        in_doc += len(doc)
        if end:
            if in_doc and eos_id is not None:
                out.append(eos_id)
            in_doc = 0
    return in_doc


def memory_stream(pieces, tokenizer, eos_id: int | None, max_tokens: int | None = None) -> np.ndarray:
    """The token stream of ``pieces`` in memory: ``[L]`` int32."""
    parts: list[array] = []
    tokenize_stream(pieces, tokenizer, eos_id, parts.append, max_tokens)
    return np.concatenate([np.frombuffer(p, dtype=np.int32) for p in parts]) if parts else np.zeros(0, np.int32)


# ----------------------------------------------------------------------------- the cache


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: the fast tokenizer's whole definition (else its vocabulary), class and special
    tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, len(tokenizer), str(getattr(tokenizer, "special_tokens_map", {}))]
    if backend is None:  # a slow tokenizer's behaviour also hangs on its init options (lower-casing ...)
        extra.append(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str))
    return hashlib.sha256((spec + json.dumps(extra)).encode()).hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_folder(
    source: str,
    setting: str,
    say: Callable[[str], None],
    *,
    folder: str = CACHE_FOLDER,
    fallback: str = "tokens",
    key: str = "data.token_cache",
    label: str = "token cache",
    choices: str = "auto or off",
    beside: bool = True,
) -> Path:
    """Where the files made from ``source`` go for a ``key`` setting of auto or a folder: beside ``source`` in
    ``folder``, else (read-only there, or ``beside`` False: not a local path) under ``$ALIGNKD_CACHE/fallback``."""
    if setting != "auto":
        chosen = Path(setting).expanduser()
        if not _writable(chosen):
            raise DataError(f"{key}: cannot write to {chosen}; choose a writable folder, or {choices}")
        return chosen
    near = Path(source).resolve().parent / folder
    if beside and _writable(near):
        return near
    from alignkd.assets.store import cache_dir

    far = cache_dir() / fallback
    if not _writable(far):
        raise DataError(
            f"{key}: neither {near.parent} nor {far} is writable; set {key} to a writable folder or {choices}"
        )
    if beside:
        say(f"{label}: {near.parent} is not writable; caching {fallback} in {far}")
    return far


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` (POSIX; elsewhere no lock: concurrent builders then each write the file)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _meta(path: Path, data: Path) -> dict | None:
    """The metadata of a complete cache file, or None (missing, unreadable, or not matching the data file)."""
    try:
        meta = json.loads(path.read_text())
        return meta if data.stat().st_size == meta["tokens"] * DISK_DTYPE.itemsize else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_stream(
    source: str,
    files: list[Path],
    tokenizer,
    eos_id: int | None,
    pieces: Callable[[], Iterable[tuple[str, bool]]],
    *,
    text_field: str,
    setting: str,
    max_tokens: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> np.ndarray:
    """The token stream of ``source`` (read from ``files`` by ``pieces()``): ``[L]`` int32, memory-mapped.

    Reuses the cache file when its key matches and it holds the whole stream (or at
    least ``max_tokens``); else tokenises into it. Says which, through ``say``.
    """
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    key = {
        "format": FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": eos_id,
        "text_field": text_field,
        "files": stats,
        "pieces": [WHOLE_TEXT_BYTES, TEXT_PIECE_CHARS],  # how big text files are cut
    }
    digest = _digest(key)
    folder = cache_folder(source, setting, say)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source).resolve().name) or "source"
    data, meta_path = folder / f"{stem}-{digest}.tokens", folder / f"{stem}-{digest}.json"
    with locked(folder / f"{stem}-{digest}.lock"):
        meta = _meta(meta_path, data)
        if meta and (meta["complete"] or (max_tokens is not None and meta["tokens"] >= max_tokens)):
            say(f"token cache: reusing {data} ({meta['tokens']:,} tokens of {source})")
        else:
            meta = {"source": str(Path(source).resolve()), "files": _digest(stats)}
            meta |= _build(source, data, meta_path, meta, tokenizer, eos_id, pieces(), max_tokens, say)
            _drop_stale(folder, meta_path, meta)
    n = meta["tokens"]
    return np.memmap(data, dtype=DISK_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, DISK_DTYPE)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _build(source, data: Path, meta_path: Path, meta: dict, tokenizer, eos_id, pieces, max_tokens, say) -> dict:
    """Tokenise into ``data``, then write ``meta`` (plus the token count) to ``meta_path``; returns the count part."""
    t0 = time.perf_counter()
    tmp = data.with_name(f"{data.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            tokens, complete = tokenize_stream(
                pieces, tokenizer, eos_id, lambda a: np.frombuffer(a, np.int32).astype(DISK_DTYPE).tofile(f), max_tokens
            )
        os.replace(tmp, data)
    finally:
        tmp.unlink(missing_ok=True)
    counted = {"tokens": tokens, "complete": complete}
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta | counted))
    os.replace(tmp_meta, meta_path)  # last: the data file is whole once this exists
    what = "" if complete else f", the first {tokens:,} (data.max_train_tokens)"
    say(
        f"token cache: tokenised {source} into {data} ({tokens:,} tokens{what}, {time.perf_counter() - t0:.0f} s); "
        "later runs reuse it"
    )
    return counted


def _drop_stale(folder: Path, keep: Path, meta: dict) -> None:
    """Remove the cache files of the same source made from its files as they were before a change.

    Their key holds the old sizes and times, so no run can match them again; files
    of the same source for another tokenizer or text_field stay, for runs that use those.
    """
    for other in folder.glob("*.json"):
        try:
            old = json.loads(other.read_text())
            if other == keep or old.get("source") != meta["source"] or old.get("files") == meta["files"]:
                continue
        except (OSError, ValueError, AttributeError):
            continue
        for suffix in (".tokens", ".json", ".lock"):
            other.with_suffix(suffix).unlink(missing_ok=True)
