"""alignkd inside other training loops: ``DistillTrainer`` (a ``transformers.Trainer``) and its collator.

A script that already trains with a Trainer keeps its datasets, arguments and
callbacks and gains alignkd's loss terms; see docs/integrations.md.
"""

from alignkd.integrations.collator import DistillCollator
from alignkd.integrations.meet import Meeting, checked_config, meet
from alignkd.integrations.trainer import DistillTrainer

__all__ = ["DistillCollator", "DistillTrainer", "Meeting", "checked_config", "meet"]
