"""``write_report``: read a run folder, build the blocks once, write report.html and report.md."""

from __future__ import annotations

from pathlib import Path

from alignkd.errors import ReportError
from alignkd.report.blocks import block_blocks
from alignkd.report.document import Block, Plot
from alignkd.report.evaluation import evaluation_blocks
from alignkd.report.headline import headline
from alignkd.report.plots import plots
from alignkd.report.render import to_html, to_markdown
from alignkd.report.runlog import RunLog, read_json, read_run
from alignkd.report.tasks import task_blocks


def write_report(
    run_dir: str | Path,
    *,
    eval_json: str | Path | None = None,
    baselines: dict[str, str | Path] | None = None,
    out: str | Path | None = None,
) -> dict[str, Path]:
    """Write ``OUT/report.html`` and ``OUT/report.md`` (plots in ``OUT/report_files/``) for a run folder.

    ``eval_json`` defaults to ``RUN_DIR/eval.json`` (skipped when absent); ``baselines``
    maps a name to another run folder whose CE loss and eval curves are overlaid;
    ``out`` defaults to ``RUN_DIR``. Returns ``{"html": path, "md": path}``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"no metrics.jsonl in {run_dir}: is it an alignkd distill output_dir? (no such folder)")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ReportError(f"--out {out} is a file; give the folder report.html and report.md go in")
    run = read_run(run_dir)
    base_runs = _read_baselines(baselines)
    summary = read_json(run_dir / "summary.json", "summary")
    ev = _read_eval(run_dir, eval_json)
    config = run_dir / "config.yaml"
    config_text = config.read_text(errors="replace") if config.is_file() else None

    out = Path(out) if out is not None else run_dir
    files_dir = _emptied_files_dir(out)

    curves, schedules = plots(run, base_runs, summary)
    blocks = _opening_blocks(run, run_dir, summary, ev, base_runs) + _plot_blocks(curves, schedules)
    selection = block_blocks(read_json(run_dir / "block_scores.json", "block scores"))
    blocks += selection
    if ev:
        blocks += evaluation_blocks(ev) + task_blocks(ev)
    if config_text is not None:
        blocks += [("h2", "Config"), ("code", config_text)]

    files = _write_plots(files_dir, curves + schedules + [b[1] for b in selection if b[0] == "plot"])
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(to_html(blocks, f"alignkd report: {run.name}"), encoding="utf-8")
    md_path.write_text(to_markdown(blocks, files), encoding="utf-8")
    return {"html": html_path, "md": md_path}


def _read_baselines(baselines: dict[str, str | Path] | None) -> list[RunLog]:
    """Returns each baseline's run log, in the order given; a bad one's error names the baseline."""
    base_runs = []
    for name, path in (baselines or {}).items():
        try:
            base_runs.append(read_run(path, name))
        except ReportError as e:
            raise ReportError(f"baseline run {name!r}: {e}") from None
    return base_runs


def _read_eval(run_dir: Path, eval_json: str | Path | None) -> dict | None:
    """Returns the eval results (``eval_json``, else the run's own eval.json if there is one)."""
    if eval_json is not None and not Path(eval_json).is_file():
        raise ReportError(f"no eval.json at {eval_json}: write one with `alignkd eval` or leave out --eval")
    return read_json(Path(eval_json) if eval_json is not None else run_dir / "eval.json", "eval results")


def _emptied_files_dir(out: Path) -> Path:
    """Returns ``OUT/report_files``, created if need be and holding no plots from an earlier report."""
    files_dir = out / "report_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    for stale in files_dir.glob("*.png"):  # the folder is the report's own: no plots from an earlier report
        stale.unlink()
    return files_dir


def _opening_blocks(
    run: RunLog, run_dir: Path, summary: dict | None, ev: dict | None, base_runs: list[RunLog]
) -> list[Block]:
    """Returns the title, run folder, headline paragraph and a note on any metrics lines that were skipped."""
    blocks: list[Block] = [
        ("h1", f"Distillation report: {run.name}"),
        ("meta", f"Run folder: {run_dir.resolve()}"),
        ("p", headline(run, summary, ev, base_runs)),
    ]
    skipped = run.skipped + sum(b.skipped for b in base_runs)
    if skipped:
        blocks.append(
            (
                "p",
                f"{skipped} line(s) of metrics.jsonl were not JSON records (a write cut off mid-line?) "
                "and were skipped.",
            )
        )
    return blocks


def _plot_blocks(curves: list[Plot], schedules: list[Plot]) -> list[Block]:
    """Returns the training-curve and schedule sections (each left out when it has no plots)."""
    blocks: list[Block] = []
    if curves:
        blocks += [("h2", "Training curves")] + [("plot", p) for p in curves]
    if schedules:
        blocks += [("h2", "Weights and schedules")] + [("plot", p) for p in schedules]
    return blocks


def _write_plots(files_dir: Path, shown: list[Plot]) -> dict[str, str]:
    """Returns each plot's name mapped to its PNG's path relative to the report, after writing the PNGs."""
    files = {}
    for p in shown:
        (files_dir / f"{p.name}.png").write_bytes(p.png)
        files[p.name] = f"{files_dir.name}/{p.name}.png"
    return files
