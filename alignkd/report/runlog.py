"""Reading what a run wrote: metrics.jsonl as a :class:`RunLog`, and the JSON files beside it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from alignkd.errors import ReportError
from alignkd.evaluate.catalogue import number


@dataclass
class RunLog:
    """The records of one run's metrics.jsonl, split, sorted by step, one record per step."""

    name: str
    path: Path
    train: list[dict]
    eval: list[dict]
    skipped: int = 0  # lines that were not JSON objects (e.g. cut off by a crash mid-write)

    def series(self, key: str, split: str = "train") -> tuple[list[int], list[float]]:
        """Steps and values of ``key``, NaN where a record lacks it or holds no number."""
        records = self.train if split == "train" else self.eval
        rows = [(r["step"], number(r.get(key))) for r in records if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def keys(self, prefix: str, split: str = "train") -> list[str]:
        """Keys starting with ``prefix``, in the order the records first show them."""
        records = self.train if split == "train" else self.eval
        seen: dict[str, None] = {}
        for r in records:
            for k in r:
                if k.startswith(prefix):
                    seen.setdefault(k)
        return list(seen)


def read_run(path: str | Path, name: str | None = None) -> RunLog:
    """Read ``path/metrics.jsonl``; a missing folder or file is a ReportError."""
    path = Path(path)
    log = path / "metrics.jsonl"
    if not log.is_file():
        raise ReportError(f"no metrics.jsonl in {path}: is it an alignkd distill output_dir?")
    by_step: dict[tuple[str, int], dict] = {}
    skipped = 0
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)  # Python's json reads the NaN and Infinity that the training loop writes
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            skipped += 1
            continue
        # A resumed run logs again the steps after its checkpoint: the later record wins.
        by_step[(rec.get("split", "train"), int(rec["step"]))] = rec
    ordered = [by_step[k] for k in sorted(by_step, key=lambda k: k[1])]
    return RunLog(
        name=name or path.resolve().name,
        path=path,
        train=[r for r in ordered if r.get("split", "train") == "train"],
        eval=[r for r in ordered if r.get("split") == "eval"],
        skipped=skipped,
    )


def read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); write it again") from None
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} should hold a JSON object, not {type(data).__name__}")
    return data


def finite(v) -> bool:
    return math.isfinite(number(v))


def first_finite(values: list[float]) -> float | None:
    return next((v for v in values if math.isfinite(v)), None)


def last_finite(values: list[float]) -> float | None:
    return next((v for v in reversed(values) if math.isfinite(v)), None)
