"""``study_run.json``: what a run of a study was made from, so a later ``--only`` knows which finished runs still
apply."""

from __future__ import annotations

import json
from pathlib import Path

from alignkd.study.spec import Study

MARKER = "study_run.json"


def fingerprint(study: Study, name: str, quick: bool, step: bool = False) -> dict:
    """What a run depends on in the study file, in a form that compares equal after a JSON round trip."""
    spec = study.spec
    if step:
        entry = {"set": study.step(name).set}
    else:  # a variant on a prepared model is stale too when that step's entry changes
        needs = {s: study.step(s).set for s in study.steps_needed([name])}
        entry = {"overrides": study.overrides[name], "budget": vars(spec.budget), "prepare": needs}
    mine = {"base": spec.base, **entry, "quick": quick, "quick_spec": vars(spec.quick) if quick else None}
    return json.loads(json.dumps(mine, sort_keys=True, default=str))


def read_marker(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
