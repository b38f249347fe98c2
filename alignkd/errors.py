"""The errors that mean bad input. The bottom of the package: it imports nothing.

Each is a ``UserError``: the CLI shows its message as one line and exits 2. The
message says what is wrong and how to fix it.
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


class AssetError(UserError):
    """A packaged asset could not be fetched or prepared; the message says which step and how to retry."""


USER_ERRORS = (UserError,)
"""What the CLI turns into one line and exit code 2."""
