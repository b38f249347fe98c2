"""Writes that fail for want of room (a full device or quota) or permission, told apart from other failures.

torch, safetensors and transformers report a full disk each in their own words:
torch's zip writer as a ``RuntimeError`` (``unexpected pos ...``, ``file write
failed``) that holds the ``OSError`` at most in its context, safetensors (and so
``save_pretrained``) as ``I/O error: No space left on device (os error 28)``.
:func:`disk_errno` finds the operating system's reason in any of them, so that a
run can say in one line what did not fit where, and let every other error through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}
"""The failed writes a run reports as the disk's (one line, exit 2) rather than as a traceback."""
ROOM = (errno.ENOSPC, errno.EDQUOT)
"""The reasons that more room fixes (the others: permission to write)."""

_NUMBERED = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]", re.IGNORECASE)
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error")
"""What torch's C++ file writer says when a write fails; it drops the operating system's reason."""


def _chain(exc: BaseException):
    """``exc`` and every exception it was raised from or while handling, each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def disk_errno(exc: BaseException, folder: Path | None = None, needed: int | None = None) -> int | None:
    """The errno among :data:`REASONS` that made ``exc`` (raised writing into ``folder``), or None: another failure.

    ``needed``: about how many bytes the write needed. Only for torch's file writer,
    which keeps no reason: its failure counts as a full disk when ``folder`` has less
    room left than that (or than 1 MiB), since a write that fills the device stops there.
    """
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in REASONS:
            return e.errno
        text = str(e)
        for match in _NUMBERED.finditer(text):
            code = int(match.group(1) or match.group(2))
            if code in REASONS:
                return code
        for code in REASONS:
            if os.strerror(code).lower() in text.lower():
                return code
    torch_writer = any(mark in str(e) for e in _chain(exc) for mark in _TORCH_WRITER)
    if torch_writer and folder is not None and free_bytes(folder) < max(needed or 0, 1 << 20):
        return errno.ENOSPC
    return None


def free_bytes(path: Path) -> int:
    """The free space ``shutil.disk_usage`` reports where ``path`` is (or would be)."""
    near = next((p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists()), Path("/"))
    return shutil.disk_usage(near).free


def folder_bytes(path: Path) -> int:
    """The size of the files under ``path`` (a file: its own size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of ``tensors`` as a file would store them: a tensor held under two names (tied weights) once."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def human(n: int | float) -> str:
    """``25300000`` -> ``"25.3 MB"`` (decimal units, as ``df -H`` and file managers show them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def why(code: int, where: Path, needed: int | None) -> str:
    """The reason of a failed write, with the room it needed and the room there is where it went.

    E.g. ``no space left on the device (it needs about 25.3 MB; 18.0 MB free there)``.
    """
    if code not in ROOM:
        return REASONS[code]
    need = f"it needs about {human(needed)}; " if needed else ""
    return f"{REASONS[code]} ({need}{human(free_bytes(where))} free there)"


def fix(code: int, where: Path) -> str:
    """What makes the write possible again."""
    return "free some space" if code in ROOM else f"make {where} writable"


def save_torch(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write keeps its ``OSError`` (torch's writer drops it)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
