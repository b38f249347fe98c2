"""``python -m alignkd``: the command line, as ``accelerate launch -m alignkd distill CONFIG`` starts it."""

from alignkd.cli import entry

if __name__ == "__main__":  # imported (e.g. by the layout test), it runs nothing
    entry()
