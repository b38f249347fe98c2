"""The errors that mean bad input, and the disk's. The bottom of the package: it imports nothing.

Each bad input is a ``UserError``: the CLI shows its message as one line and exits 2.
The message says what is wrong and how to fix it. A ``DiskError`` is no fault of the
input, but it is fixed outside alignkd too, and is shown the same way.
"""


class UserError(ValueError):
    """Bad input from the user (a config, a path, a layer index, a file)."""


class ConfigError(UserError):
    """A bad config value or key; the message says which field and how to fix it."""


class DataError(UserError):
    """Bad data input; the message is one line saying what to fix."""


class ModelError(UserError):
    """A model or tokenizer could not be loaded or does not fit; one line says why."""


class FamilyError(UserError):
    """A model whose block layout alignkd does not know."""


class LayerMapError(UserError):
    """A layer map that does not fit the two models."""


class EvalError(UserError):
    """Bad evaluation input (a path, a setting, unusable data)."""


class ReportError(UserError):
    """A run folder that cannot be reported on."""


class TrainingError(UserError):
    """The run cannot go on (e.g. several steps in a row with non-finite losses); says what to change."""


class ExportError(UserError):
    """A model that cannot be exported as asked (its family, its tokenizer, the output path); one line says why."""


class AssetError(UserError):
    """A packaged asset could not be fetched or prepared; the message says which step and how to retry."""


class DiskError(OSError):
    """A write that failed for want of room (a full device or quota) or permission; one line says what could not
    be written where, the room it needed and had, and what to run once it is fixed. ``errno`` is the reason's."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


USER_ERRORS = (UserError, DiskError)
"""What the CLI turns into one line and exit code 2."""
