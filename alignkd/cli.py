"""The ``alignkd`` command line."""

from __future__ import annotations

import argparse
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
    return parser


def _distill(args) -> int:
    import yaml

    from alignkd.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from transformers.utils import logging as hf_logging

    from alignkd.train import distill

    hf_logging.disable_progress_bar()  # our own progress display; errors stay one line

    summary = distill(cfg, resume=args.resume)
    s, t = summary["student_eval"], summary["teacher_eval"]
    key = "eval_ppl" if "eval_ppl" in s else "eval_accuracy" if "eval_accuracy" in s else "eval_loss"
    print(
        f"student saved to {summary['student_dir']} ({summary['student_params'] / 1e6:.2f}M params vs teacher "
        f"{summary['teacher_params'] / 1e6:.2f}M); held-out {key}: student {s.get(key, float('nan')):.4g}, teacher {t.get(key, float('nan')):.4g}"
    )
    return 0


COMMANDS = {"distill": _distill}


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
    from alignkd.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        # Bad input: one line that says what to fix, not a traceback.
        print(f"alignkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
