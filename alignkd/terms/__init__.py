"""Loss term types: one ``TermType`` each, in one map.

Adding a type is one pure function in ``alignkd.losses``, one definition here
(config dataclass, captures, term function) and one parity test.
"""

from alignkd.terms.base import ScheduleConfig, StepTensors, Term, TermConfig, TermType
from alignkd.terms.blockwise import BLOCKWISE
from alignkd.terms.features import ATTENTION, CONTRASTIVE, EMBEDDING, HIDDEN, HIDDEN_METRICS, RELATION
from alignkd.terms.outputs import CE, DKD, KL
from alignkd.terms.spans import HYBRID, SPAN_HIDDEN, SPAN_LIKELIHOOD, SPAN_TYPES

TERM_TYPES: dict[str, TermType] = {
    "ce": CE,
    "kl": KL,
    "dkd": DKD,
    "hidden": HIDDEN,
    "embedding": EMBEDDING,
    "attention": ATTENTION,
    "relation": RELATION,
    "contrastive": CONTRASTIVE,
    "blockwise": BLOCKWISE,
    "span_likelihood": SPAN_LIKELIHOOD,
    "hybrid": HYBRID,
    "span_hidden": SPAN_HIDDEN,
}

__all__ = [
    "HIDDEN_METRICS",
    "SPAN_TYPES",
    "TERM_TYPES",
    "ScheduleConfig",
    "StepTensors",
    "Term",
    "TermConfig",
    "TermType",
    "check_pairing",
    "role",
]


def check_pairing(types: list[str], paired: bool) -> None:
    """Raise ConfigError naming the first of ``types`` (the run's loss types, in order) that does not fit: across
    tokenizers (``paired``) only ce and the span terms apply; with one tokenizer the span terms do not."""
    from alignkd.errors import ConfigError

    for i, name in enumerate(types):
        spans = name in SPAN_TYPES
        if paired and not spans and name in TERM_TYPES and TERM_TYPES[name].uses_teacher:
            raise ConfigError(
                f"losses[{i}] ({name}): the student's tokenizer is not the teacher's, so their tokens do not line "
                f"up; use {', '.join(SPAN_TYPES)} (or ce), which compare the two over aligned spans of text"
            )
        if spans and not paired:
            raise ConfigError(
                f"losses[{i}] ({name}): compares two tokenizations, and the teacher and student share one; "
                "use kl or hidden"
            )


def role(type_name: str) -> str:
    """What a term of this type matches: ``truth`` (the ground truth: ce), ``output`` (the teacher's
    output distribution: kl, dkd) or ``feature`` (the teacher's internals: every other type).

    Ratio weighting scales each feature term to the first output term's value.
    """
    kind = TERM_TYPES[type_name]
    if not kind.uses_teacher:
        return "truth"
    # Block-wise KD reads logits too, but of the teacher's blocks run on a student state.
    return "output" if kind.reads_logits and not kind.layered else "feature"
