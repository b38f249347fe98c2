"""Tests of alignkd.report on a recorded run folder.

``tests/data/report_run/`` is a 60-step feature-alignment run (kl, ce, hidden and
relation under GradNorm, a scheduled kl temperature, eval every 20 steps, one NaN
grad norm) with its config, summary and an eval.json of teacher, student and
baseline; ``tests/data/report_baseline/`` is a CE-only run of the same length.
Both were written by ``tests/data/report_run/generate.py``. The tests check the two
files the report promises, that every plot is a real embedded PNG, that the HTML
fetches nothing, the formatted numbers of the tables, the degraded reports (no
eval.json, no summary, a short or damaged log), the errors, the CLI, and, where
Chromium is installed, that a browser renders the page with every image.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html import escape
from pathlib import Path

import pytest
from PIL import Image

from alignkd.cli import main
from alignkd.report import ReportError, write_report

DATA = Path(__file__).resolve().parent / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'<img id="plot-([\w-]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The full report (eval.json, summary, config, a CE baseline), written once for the module."""
    root = tmp_path_factory.mktemp("report")
    run = shutil.copytree(DATA / "report_run", root / "run")
    paths = write_report(run, baselines={"ce": DATA / "report_baseline"})
    return {"run": run, **paths, "html_text": paths["html"].read_text(), "md_text": paths["md"].read_text()}


def md_table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The first table under ``## heading`` as {row label: {column: cell}}."""
    lines = md.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    header, rows = block[0], block[2:]
    return {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in rows}


def embedded_pngs(html: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in DATA_URI.findall(html)}


# ---------------------------------------------------------------- the full report


def test_writes_both_files_with_one_embedded_png_per_plot(report):
    assert report["html"] == report["run"] / "report.html" and report["html"].is_file()
    assert report["md"] == report["run"] / "report.md" and report["md"].is_file()
    pngs = embedded_pngs(report["html_text"])
    files = sorted(p.stem for p in (report["run"] / "report_files").glob("*.png"))
    assert sorted(pngs) == files == ["eval", "losses", "schedules", "weights"]
    assert report["html_text"].count("<img ") == len(pngs)
    for name, data in pngs.items():
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(io.BytesIO(data)) as im:
            assert im.width > 100 and im.height > 100, (name, im.size)
        assert data == (report["run"] / "report_files" / f"{name}.png").read_bytes(), name


def test_html_is_self_contained(report):
    html = report["html_text"]
    assert "http://" not in html and "https://" not in html
    assert "<style>" in html
    assert not re.search(r"<(link|script)\b", html)
    assert re.search(r'<img [^>]*src="(?!data:image/png;base64,)', html) is None


def test_md_references_existing_pngs(report):
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report["md_text"])
    assert len(refs) == 4
    for ref in refs:
        assert not Path(ref).is_absolute() and ref.startswith("report_files/")
        assert (report["md"].parent / ref).read_bytes().startswith(PNG_SIGNATURE)


def test_headline(report):
    md = report["md_text"]
    assert "49.56M parameters against the teacher's 134.52M (63.2% fewer)" in md
    assert "Held-out perplexity: teacher 18.12, student 36.25, baseline 45.10." in md
    assert (
        "What the student keeps of the teacher: perplexity 50.0% (the teacher's over the student's: lower is "
        "better), accuracy 79.6%; it is" in " ".join(md.split())
    )
    assert "3.11× faster at prefill and 3.50× faster at decoding" in md
    assert "Trained 60 steps in 49 s" in md


def test_eval_table_formats_and_bold(report):
    table = md_table(report["md_text"], "Evaluation")
    assert list(table["Perplexity"]) == ["teacher", "student", "baseline"]
    expect = {
        "Perplexity": ("18.12", "**36.25**", "45.10"),
        "Accuracy": ("81.0%", "**64.5%**", "58.5%"),
        "BLEU": ("3.2", "**2.6**", "1.9"),
        "ROUGE-1": ("0.214", "**0.193**", "0.168"),
        "ROUGE-2": ("0.052", "**0.040**", "0.030"),
        "ROUGE-L": ("0.184", "**0.171**", "0.150"),
        "CER": ("0.703", "**0.735**", "0.750"),  # lower is better
        "Prefill ms/token": ("1.23", "0.40", "0.40"),  # equal as shown: a tie bolds nothing
        "Decode ms/token": ("9.01", "2.57", "**2.56**"),
        "Decode tokens/s": ("111", "389", "**391**"),
        "Parameters": ("134.52M", "49.56M", "49.56M"),
        "Non-embedding parameters": ("106.20M", "21.25M", "21.25M"),
        "Size (MB)": ("513.1", "189.1", "189.1"),
        "Tokens scored (perplexity)": ("16,128", "16,128", "16,128"),
        "BLEU vs teacher": ("—", "**20.1**", "11.4"),
        "ROUGE-L vs teacher": ("—", "**0.281**", "0.225"),
        "CER vs teacher": ("—", "**0.612**", "0.681"),
    }
    for row, cells in expect.items():
        assert tuple(table[row].values()) == cells, row
    # The fidelity rows follow the quality, speed and size rows.
    labels = list(table)
    assert labels.index("BLEU vs teacher") > labels.index("Size (MB)")
    # The HTML holds the same table.
    html = report["html_text"]
    assert "<th>teacher</th><th>student</th><th>baseline</th>" in html
    assert "<tr><td>Perplexity</td><td>18.12</td><td><strong>36.25</strong></td><td>45.10</td></tr>" in html


def test_retention_table(report):
    table = md_table(report["md_text"], "Retention and speed-up")
    assert list(table["Perplexity retained"]) == ["student", "baseline"]
    assert tuple(table["Perplexity retained"].values()) == ("**50.0%**", "40.2%")
    assert tuple(table["Decode speed-up"].values()) == ("3.50×", "**3.52×**")
    assert tuple(table["Parameters (share of teacher)"].values()) == ("36.8%", "36.8%")
    assert "<h2>Retention and speed-up</h2>" in report["html_text"]


def test_config_appears(report):
    config = (report["run"] / "config.yaml").read_text()
    assert f"```yaml\n{config.rstrip()}\n```" in report["md_text"]
    assert "<pre><code>teacher:\n  path: HuggingFaceTB/SmolLM2-135M-Instruct" in report["html_text"]
    assert "temperature_schedule:\n    kind: linear" in report["html_text"]


def test_eval_path_and_out_folder(tmp_path):
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    ev = (run / "eval.json").rename(tmp_path / "elsewhere.json")
    paths = write_report(run, eval_json=ev, out=tmp_path / "out")
    assert paths == {"html": tmp_path / "out" / "report.html", "md": tmp_path / "out" / "report.md"}
    md = paths["md"].read_text()
    assert "## Evaluation" in md and (tmp_path / "out" / "report_files" / "losses.png").is_file()
    assert not (run / "report.html").exists()
    with pytest.raises(ReportError, match="no eval.json at"):
        write_report(run, eval_json=tmp_path / "missing.json")


def test_nulls_and_a_lone_student(tmp_path):
    """alignkd eval writes null for what it cannot measure (size of a hub model, a ratio over 0)."""
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    ev = json.loads((run / "eval.json").read_text())
    del ev["models"]["baseline"], ev["retention"]["baseline"]
    ev["models"]["teacher"]["metrics"]["size_mb"] = None
    ev["retention"]["student"]["decode_speedup"] = None
    ev["settings"]["ppl_tokens"] = None
    (run / "eval.json").write_text(json.dumps(ev))
    md = write_report(run)["md"].read_text()
    table = md_table(md, "Evaluation")
    assert list(table["Perplexity"]) == ["teacher", "student"]
    assert tuple(table["Size (MB)"].values()) == ("—", "189.1")
    assert tuple(table["Perplexity"].values()) == ("18.12", "36.25")  # one candidate: nothing to bold
    assert tuple(md_table(md, "Retention and speed-up")["Decode speed-up"].values()) == ("—",)
    assert "3.11× faster at prefill." in md


# ---------------------------------------------------------------- partial and damaged runs


def test_missing_optional_files_skip_their_sections(tmp_path):
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    for name in ("eval.json", "summary.json", "config.yaml"):
        (run / name).unlink()
    paths = write_report(run)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    for heading in ("Evaluation", "Retention and speed-up", "Config"):
        assert f"## {heading}" not in md and f"<h2>{heading}</h2>" not in html
    assert "Eval-split perplexity at the end of training: student 34.47." in md
    assert len(embedded_pngs(html)) == 4
    assert "Trained 60 steps; total loss" in md


def test_short_run_with_nan_and_a_cut_off_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        '{"split": "train", "step": 1, "loss": 9.0, "loss/kl": 5.0, "loss/ce": 4.0, '
        '"w/kl": 1.0, "w/ce": 1.0, "lr": 1e-4, "grad_norm": 3.0}',
        '{"split": "train", "step": 2, "loss": NaN, "loss/kl": NaN, "loss/ce": 3.5, '
        '"w/kl": 1.1, "w/ce": 0.9, "lr": 2e-4, "grad_norm": Infinity}',
        '{"split": "eval", "step": 2, "eval_loss": 3.3, "eval_ppl": 27.1}',
        '{"split": "train", "step": 3, "loss": 8.',  # the process died mid-write
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    paths = write_report(run)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "1 line(s) of metrics.jsonl were not JSON records" in md
    assert "Trained 2 steps; total loss 9 → 9." in md
    pngs = embedded_pngs(html)
    assert sorted(pngs) == ["eval", "losses", "schedules", "weights"]
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs.values())


def test_static_loss_weights_draw_no_plot(tmp_path):
    lines = [
        json.dumps({"split": "train", "step": i, "loss": 5.0 - i, "loss/kl": 5.0 - i, "w/kl": 1.0, "lr": 1e-4})
        for i in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    paths = write_report(tmp_path)
    assert "weights" not in embedded_pngs(paths["html"].read_text())
    assert "Loss weights over training" not in paths["md"].read_text()


def test_empty_log_still_reports(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    paths = write_report(tmp_path)
    assert "The run logged no training steps." in paths["md"].read_text()
    assert "<img" not in paths["html"].read_text()


def test_missing_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(ReportError) as err:
        write_report(tmp_path)
    assert str(err.value) == f"no metrics.jsonl in {tmp_path}: is it an alignkd distill output_dir?"
    with pytest.raises(ReportError, match=r"no metrics.jsonl in .*\(no such folder\)") as err:
        write_report(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(ReportError, match="baseline run 'ce': no metrics.jsonl in"):
        write_report(DATA / "report_run", baselines={"ce": tmp_path}, out=tmp_path / "out")


def test_corrupt_eval_json_is_a_one_line_error(tmp_path):
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    (run / "eval.json").write_text('{"models": ')
    with pytest.raises(ReportError, match="eval.json is not valid JSON") as err:
        write_report(run)
    assert "\n" not in str(err.value)


def test_text_is_escaped(tmp_path):
    out = tmp_path / "out"
    paths = write_report(DATA / "report_run", baselines={"<ce&>": DATA / "report_baseline"}, out=out)
    html = paths["html"].read_text()
    assert "&lt;ce&amp;&gt;" in html and "<ce&>" not in html


# ---------------------------------------------------------------- the CLI


def test_cli_prints_the_paths(tmp_path, capsys):
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    assert main(["report", str(run), "--baseline-run", f"ce={DATA / 'report_baseline'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"report: {run / 'report.html'}", f"report: {run / 'report.md'}"]
    assert "Baseline runs drawn for comparison: ce (" in (run / "report.md").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"alignkd report: error: no metrics.jsonl in {tmp_path}: is it an alignkd distill output_dir?\n"
    assert main(["report", str(DATA / "report_run"), "--baseline-run", "ce=", "--out", str(tmp_path)]) == 2
    assert "--baseline-run expects NAME=DIR" in capsys.readouterr().err


# ---------------------------------------------------------------- in a browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Appended to a copy of the page: counts the images the browser actually decoded.
COUNT_IMAGES = """<script>
window.addEventListener("load", function () {
  var n = 0;
  document.querySelectorAll("img").forEach(function (im) { if (im.complete && im.naturalWidth > 0) n++; });
  document.body.dataset.loaded = String(n);
});
</script>"""


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("chromium is not installed")
    return path


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_browser_renders_every_image(report, tmp_path):
    page = tmp_path / "check.html"
    page.write_text(report["html_text"].replace("</body>", COUNT_IMAGES + "</body>"))
    done = run_chromium(["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp_path / "profile")
    body = re.search(r"<body[^>]*>", done.stdout)
    assert body, f"no DOM from chromium (rc {done.returncode}): {done.stderr[-500:]}"
    assert f'data-loaded="{len(embedded_pngs(report["html_text"]))}"' in body.group(0)


@pytest.mark.slow
def test_browser_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    done = run_chromium(
        [f"--screenshot={shot}", "--window-size=1280,4000", report["html"].as_uri()], tmp_path / "profile"
    )
    assert shot.is_file(), f"no screenshot (rc {done.returncode}): {done.stderr[-500:]}"
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000  # text, tables and plots, not an empty page


# ---------------------------------------------------------------- accuracy above chance


def _with_accuracies(run: Path, accuracies: dict[str, float], chance: float) -> None:
    """Rewrite the run's eval.json as alignkd eval would have with these accuracies and this chance level."""
    from alignkd.evaluate.catalogue import near_chance, retention

    ev = json.loads((run / "eval.json").read_text())
    for name, acc in accuracies.items():
        ev["models"][name]["metrics"].update(accuracy=acc, accuracy_chance=chance, accuracy_above_chance=acc - chance)
    teacher = ev["models"]["teacher"]["metrics"]
    ev["retention"] = {n: retention(teacher, m["metrics"]) for n, m in ev["models"].items() if n != "teacher"}
    ev["warnings"] = [w for w in (near_chance(teacher),) if w]
    (run / "eval.json").write_text(json.dumps(ev))


def test_a_teacher_near_chance_shows_the_retention_above_chance_and_a_warning(tmp_path):
    """The demo's case: 63 % on two balanced classes keeps 96.8 % for a student at 61 %, but 84.6 % above chance."""
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    _with_accuracies(run, {"teacher": 0.63, "student": 0.61, "baseline": 0.585}, chance=0.5)
    paths = write_report(run)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    table = md_table(md, "Evaluation")
    assert tuple(table["Accuracy above chance"].values()) == ("+13.0 pts", "**+11.0 pts**", "+8.5 pts")
    assert tuple(table["Chance accuracy (majority class)"].values()) == (
        "50.0%",
        "50.0%",
        "50.0%",
    )  # a setting: never bold
    kept = md_table(md, "Retention and speed-up")
    assert tuple(kept["Accuracy retained"].values()) == ("**96.8%**", "92.9%")
    assert tuple(kept["Accuracy retained above chance"].values()) == ("**84.6%**", "65.4%")
    sentence = md.split("What the student keeps of the teacher:", 1)[1].split(". ", 1)[0]
    assert "accuracy 96.8%, accuracy above chance 84.6%; it is" in sentence and "BLEU" not in sentence
    assert "The teacher's accuracy is near chance, so accuracy retention says little" in md
    warning = (
        "Warning: the teacher's accuracy (63.0%) is only 13.0 points above chance "
        "(50.0%: always answering the majority class)"
    )
    assert warning in md and escape(warning) in html


def test_a_teacher_well_above_chance_gets_no_warning(tmp_path):
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    _with_accuracies(run, {"teacher": 0.9, "student": 0.8, "baseline": 0.7}, chance=0.55)
    md = write_report(run)["md"].read_text()
    assert tuple(md_table(md, "Retention and speed-up")["Accuracy retained above chance"].values()) == (
        "**71.4%**",
        "42.9%",
    )
    assert "Warning" not in md and "near chance" not in md


def test_block_scores_get_their_section_and_plot(tmp_path):
    run = shutil.copytree(DATA / "report_run", tmp_path / "run")
    influence = [0.99, 0.17, 0.03, 0.05, 0.02, 0.15]
    scores = {
        "teacher_blocks": 6,
        "kept": 3,
        "calibration_sequences": 64,
        "block_influence": influence,
        "select": "importance",
        "rule": "importance",
        "layers": [0, 1, 5],
    }
    (run / "block_scores.json").write_text(json.dumps(scores))
    paths = write_report(run)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "## Block selection" in md and "<h2>Block selection</h2>" in html
    assert "keeps teacher blocks [0, 1, 5] of 6, chosen by importance on 64 calibration sequences" in md
    assert (run / "report_files" / "blocks.png").is_file() and "blocks" in embedded_pngs(html)
    # Without the file the section is absent (the other tests' runs have none).
    (run / "block_scores.json").unlink()
    assert "Block selection" not in write_report(run)["md"].read_text()
