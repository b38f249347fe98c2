"""``python -m alignkd`` and the ``alignkd`` console script: the command line, as ``accelerate launch -m alignkd
distill CONFIG`` starts it."""

import sys

from alignkd.cli import main


def entry() -> None:
    """``main``, then exit with its code.

    A process of a multi-process launch leaves without the interpreter's teardown
    (``backend.exit_launch``), where native threads could abort a finished run.
    """
    code = main()
    if "torch.distributed" in sys.modules:
        from alignkd.backend import exit_launch, launched_processes

        if launched_processes() > 1:
            exit_launch(code)
    sys.exit(code)


if __name__ == "__main__":  # imported (e.g. by the layout test), it runs nothing
    entry()
