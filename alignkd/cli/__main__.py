"""``python -m alignkd.cli``: the command line, as the console script runs it."""

import sys

from alignkd.cli import main

if __name__ == "__main__":  # imported (e.g. by the layout test), it runs nothing
    sys.exit(main())
