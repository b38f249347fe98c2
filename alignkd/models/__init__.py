"""Everything about models: family layouts, loading, building and pruning students.

- :mod:`~alignkd.models.families`: where blocks, attention, q/k/v and the final norm
  live in each family; the only place that knows module names.
- :mod:`~alignkd.models.loading`: teachers and tokenizers from a folder or hub id.
- :mod:`~alignkd.models.width`: which teacher blocks to keep, width pruning.
- :mod:`~alignkd.models.student`: the trainable student (from a path, teacher blocks or a config).

Dependencies point one way: families, loading <- prune <- student. This file
re-exports the loading API only, so importing one submodule does not pull in
the config package through ``student``.
"""

from alignkd.errors import ModelError
from alignkd.models.loading import (
    AUTO_CLASSES,
    check_tokenizers,
    common_vocab,
    load_model,
    load_tokenizer,
    looks_local,
)

__all__ = [
    "AUTO_CLASSES",
    "ModelError",
    "check_tokenizers",
    "common_vocab",
    "load_model",
    "load_tokenizer",
    "looks_local",
]
