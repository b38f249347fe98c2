"""Loss term types: one ``TermType`` each, in one map.

Adding a type is one pure function in ``alignkd.losses``, one definition here
(config dataclass, captures, term function) and one parity test.
"""

from alignkd.terms.base import ScheduleConfig, StepTensors, Term, TermConfig, TermType
from alignkd.terms.blockwise import BLOCKWISE
from alignkd.terms.features import ATTENTION, CONTRASTIVE, HIDDEN, HIDDEN_METRICS, RELATION
from alignkd.terms.outputs import CE, DKD, KL

TERM_TYPES: dict[str, TermType] = {
    "ce": CE,
    "kl": KL,
    "dkd": DKD,
    "hidden": HIDDEN,
    "attention": ATTENTION,
    "relation": RELATION,
    "contrastive": CONTRASTIVE,
    "blockwise": BLOCKWISE,
}

__all__ = ["HIDDEN_METRICS", "TERM_TYPES", "ScheduleConfig", "StepTensors", "Term", "TermConfig", "TermType"]
