"""``python -m alignkd``: the command line, as ``accelerate launch -m alignkd distill CONFIG`` starts it."""

import sys

from alignkd.cli import main

if __name__ == "__main__":  # imported (e.g. by the layout test), it runs nothing
    sys.exit(main())
