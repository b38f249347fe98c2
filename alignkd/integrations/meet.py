"""alignkd's loss terms met with a user's own teacher and student, for a training loop alignkd does not run.

``checked_config`` turns the ``losses`` and ``weighting`` a user gives (dataclasses,
or the dicts of a YAML config) into a validated ``Config``, through the same
loading and validation as ``alignkd distill``, so a bad key gets the same line;
and refuses what needs alignkd's own loop. ``meet`` resolves the terms against
the two models once: the plan, the trainable side (student, projectors, layer
mixtures), the teacher with its hooks, the weighting and the shared vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from alignkd.align.plan import StudentSide
from alignkd.align.tasks import TASKS, CausalLM
from alignkd.align.weighting import Weighting
from alignkd.config import Config, load_config, to_dict
from alignkd.data import resolve_bos
from alignkd.engine.setup import meet_models, term_weighting
from alignkd.errors import ConfigError, ModelError
from alignkd.models.loading import common_vocab, shares_vocabulary
from alignkd.models.student import freeze
from alignkd.teacher import Teacher
from alignkd.terms import TERM_TYPES, Term, check_pairing

GIVEN = "(given to the trainer)"
"""What stands in the config for the paths a Trainer script does not give: its models and data are objects."""

_log = logging.getLogger("alignkd.integrations")

# (config key, whether the config sets it, why a Trainer cannot do it): each refused in one line.
REFUSED = (
    (
        "teacher.task",
        lambda c: c.teacher.task != "causal_lm",
        "the trainer distils causal language models; use alignkd distill for the other tasks",
    ),
    ("teacher.cache", lambda c: c.teacher.cache, "the trainer runs the live teacher on each batch; remove it"),
    (
        "generation.sources",
        lambda c: c.generation.generates,
        "the trainer trains on its dataset's batches, it does not sample text; use {dataset: 1} or alignkd distill",
    ),
    (
        "generation.eval_prompts",
        lambda c: c.generation.eval_prompts,
        "the generation metrics belong to alignkd distill's evaluation; set it to 0",
    ),
    (
        "student.tokenizer / student.new_tokenizer",
        lambda c: c.student.tokenizer or c.student.new_tokenizer,
        "the trainer's batches are one tokenizer's ids; use alignkd distill to pair two tokenizers",
    ),
    (
        "data.augment / data.unlabelled",
        lambda c: c.data.augment or c.data.unlabelled,
        "these are for classification under alignkd distill; remove them",
    ),
)


def checked_config(losses=None, weighting=None, config=None) -> Config:
    """A validated ``Config`` holding the terms and their weighting.

    ``losses``: term configs (``alignkd.terms`` dataclasses) or dicts as in YAML;
    ``weighting``: a ``WeightingConfig`` or its dict. Or ``config``: a whole
    alignkd config (a ``Config``, its dict, or a YAML path), of which the losses and
    weighting are used and what a Trainer cannot do is refused.
    """
    if config is not None:
        if losses is not None or weighting is not None:
            raise ConfigError("DistillTrainer: give losses and weighting, or config, not both")
        if isinstance(config, Config):
            cfg = copy.deepcopy(config)
        elif isinstance(config, dict):
            cfg = load_config(data=copy.deepcopy(config))
        else:
            cfg = load_config(Path(config))
        for key, sets, why in REFUSED:
            if sets(cfg):
                raise ConfigError(f"{key}: not supported inside a transformers Trainer ({why})")
    else:
        data = {
            "teacher": {"path": GIVEN},
            "student": {"path": GIVEN},
            "data": {"train": GIVEN},
            "losses": [_plain(t) for t in losses or []],
            "weighting": _plain(weighting) if weighting is not None else {},
        }
        cfg = load_config(data=data)
    # The student's forward is the Trainer's (its wrappers included), so the output terms read logits.
    cfg.train.fused_head = False
    check_pairing([t.type for t in cfg.losses], paired=False)
    return cfg


def _plain(value):
    """A config dataclass as the dict YAML would give (``name`` left out where resolution filled it)."""
    if not dataclasses.is_dataclass(value):
        return copy.deepcopy(value)
    d = to_dict(value)
    if getattr(value, "_auto_name", False):
        d.pop("name", None)
    return d


@dataclass
class Meeting:
    """What a step reads of the terms and the two models, built once."""

    cfg: Config
    terms: list[Term]
    side: StudentSide
    """The student with its capture hooks, the projectors and layer mixtures."""
    teacher: Teacher
    weighting: Weighting
    vocab: int
    """Logit columns the two heads share."""
    task: CausalLM
    bos_id: int | None
    """The BOS the tokenizer puts first (None: it puts none, or no tokenizer was given)."""

    @property
    def needs_teacher(self) -> bool:
        return any(TERM_TYPES[t.cfg.type].uses_teacher for t in self.terms)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trained beside the student: projectors and mixtures (clipped with it), then the weighting's own."""
        side = [p for n, p in self.side.named_parameters() if not n.startswith("student.")]
        return side + self.weighting.model_params()


def meet(cfg: Config, student: nn.Module, teacher: nn.Module, tokenizer=None, teacher_tokenizer=None) -> Meeting:
    """Resolve ``cfg``'s terms against ``student`` and ``teacher`` (frozen here: no gradient, eval mode).

    ``tokenizer``: the student's (the Trainer's ``processing_class``); ``teacher_tokenizer``: the teacher's, when it
    is another object. Tokenizers that give a token different ids, and heads that do not cover the tokenizer, are
    refused.
    """
    if student is None or teacher is None:
        raise ConfigError("DistillTrainer: give the student as model= and the teacher as teacher=")
    if tokenizer is not None and teacher_tokenizer is not None and not shares_vocabulary(teacher_tokenizer, tokenizer):
        raise ModelError(
            "teacher and student tokenizers differ: DistillTrainer needs one tokenizer for both "
            "(alignkd distill pairs two tokenizations of the text with the span terms)"
        )
    # A PEFT student (LoRA) runs its base model's own modules: the hooks go there, the Trainer keeps the wrapper.
    student = student.get_base_model() if callable(getattr(student, "get_base_model", None)) else student
    vocab = _vocab(student, teacher, tokenizer or teacher_tokenizer)
    task = TASKS["causal_lm"]
    plan, side, teach = meet_models(cfg, task, student, freeze(teacher), say=_say)
    weighting = term_weighting(cfg, plan.terms)
    if cfg.weighting.strategy == "gradnorm" and not student.get_input_embeddings().weight.requires_grad:
        raise ConfigError(
            "weighting.strategy: GradNorm measures each term's gradient at the student's input embedding, which is "
            "frozen; keep it trained or choose static, ratio or uncertainty"
        )
    tok = tokenizer or teacher_tokenizer
    bos_id = resolve_bos("auto", tok) if tok is not None else None
    return Meeting(cfg, plan.terms, side, teach, weighting, vocab, task, bos_id)


def _vocab(student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The logit columns both heads share: ``common_vocab`` with a tokenizer; without one, heads must be alike."""
    if tokenizer is not None:
        return common_vocab(teacher, student, tokenizer)
    vt, vs = (m.get_output_embeddings().weight.shape[0] for m in (teacher, student))
    if vt != vs:
        raise ModelError(
            f"vocabulary mismatch: teacher head has {vt} rows, student head {vs}; pass the tokenizer as "
            "processing_class= so the shared ids are known"
        )
    return vt


def _say(message: str) -> None:
    _log.warning(re.sub(r"\[/?[a-z ]*\]", "", message))  # the engine's lines carry rich markup
