"""The one display: live rows on a terminal, plain lines anywhere else (training's are in test_precision.py)."""

from __future__ import annotations

import io

from rich.console import Console

from alignkd.display import Stages, Tasks


def plain_console(out: io.StringIO) -> Console:
    return Console(file=out, force_terminal=False, width=200)


def test_tasks_print_plain_lines_off_a_terminal():
    out = io.StringIO()
    with Tasks(console=plain_console(out)) as ui:
        ui.update("corpus", "downloading")
        ui.update("corpus", "downloading")  # unchanged: no second line
        ui.update("corpus", "extracting")
        ui.finish("corpus", "[green]ok", "prepared [2 files]")
        with ui.running("student perplexity") as step:  # a bar on a terminal; nothing per step off it
            step(1, 2)
            step(2, 2)
        ui.say("[bold]student[/]: done")
    assert out.getvalue().splitlines() == [
        "corpus: downloading",
        "corpus: extracting",
        "corpus: ok prepared [2 files]",
        "student: done",
    ]
    assert ui.seconds >= 0


def test_disabled_tasks_show_nothing():
    out = io.StringIO()
    with Tasks(False, console=plain_console(out)) as ui:
        ui.update("corpus", "downloading")
        ui.finish("corpus", "[red]failed", "see the error below")
        with ui.running("x") as step:
            step(1, 1)
        ui.say("hello")
    assert out.getvalue() == ""


def test_stages_time_each_stage():
    out = io.StringIO()
    stages = Stages(plain_console(out))
    with stages.stage("assets", "1/2 assets"):
        pass
    with stages.stage("eval", "2/2 eval"):
        pass
    assert list(stages.seconds) == ["assets", "eval"]
    lines = out.getvalue().splitlines()
    assert "1/2 assets" in lines[0] and lines[1] == "assets: 0 s" and "2/2 eval" in lines[2]
