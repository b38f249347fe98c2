"""The ``alignkd`` command line: ``main`` parses the flags (``parser``) and runs a command (``commands``)."""

from __future__ import annotations

import os
import sys

from alignkd.cli.commands import COMMANDS
from alignkd.cli.parser import RENAMED, build_parser
from alignkd.display import DEBUG, hide_hf_bars
from alignkd.errors import USER_ERRORS

__all__ = ["COMMANDS", "build_parser", "main"]

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
