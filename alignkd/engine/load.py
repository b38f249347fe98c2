"""Loading a run's models: tokenizer, frozen teacher, the student built from it, and what the heads share."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from alignkd.align.blocks import calibration_rows
from alignkd.align.tasks import TASKS
from alignkd.config import Config
from alignkd.errors import ConfigError, ModelError
from alignkd.models import common_vocab, load_model, load_tokenizer
from alignkd.models.families import OutputHead, output_head
from alignkd.models.loading import check_positions, load_skeleton, shares_vocabulary
from alignkd.models.student import build_student, freeze, to_meta
from alignkd.precision import default_device
from alignkd.terms import TERM_TYPES


@dataclass
class Inputs:
    """Tokenizer, teacher and data, loaded once for the selection and reused by the run that follows it."""

    tokenizer: object
    teacher: nn.Module
    """Frozen, with its weights (a run that reads a teacher cache empties it after building the student)."""
    train_data: dict[str, torch.Tensor]
    eval_data: dict[str, torch.Tensor]


def load_inputs(cfg) -> Inputs:
    t = cfg.teacher
    tok = load_tokenizer(t.path, what="teacher", trust_remote_code=t.trust_remote_code)
    teacher = freeze(
        load_model(t.path, task=t.task, dtype=t.dtype, what="teacher", trust_remote_code=t.trust_remote_code)
    )
    check_positions(teacher, cfg.data.seq_len, "teacher")
    train_data, eval_data = TASKS[t.task].load_data(cfg, tok)  # resolves data.bos in cfg, as the run would
    return Inputs(tok, teacher, train_data, eval_data)


def fine_tunes_teacher(cfg: Config) -> bool:
    """The student is the teacher's checkpoint and no term reads the teacher: its forward never runs."""
    return cfg.student.path == cfg.teacher.path and not any(TERM_TYPES[t.type].uses_teacher for t in cfg.losses)


PRUNE_CALIBRATION = 64  # training blocks a width-pruned student's channels are ranked on


def _calibration(cfg: Config, tok, inputs: Inputs | None, teacher: nn.Module) -> torch.Tensor | None:
    """``[N, T]`` training blocks to rank the teacher's channels on, when the student is pruned by activations; else
    None."""
    s = cfg.student
    if s.config is None or s.init != "prune" or s.importance != "activation":
        return None
    data = inputs.train_data if inputs else TASKS[cfg.teacher.task].load_data(copy.deepcopy(cfg), tok)[0]
    teacher.to(default_device())  # the calibration forward runs where the teacher will
    return calibration_rows(data, PRUNE_CALIBRATION, cfg.train.seed)["input_ids"]


def student_tokenizer(cfg: Config, say=print):
    """The student's own tokenizer: ``student.tokenizer``, else a ``path`` student's folder's; None when it has
    none of its own (it reads the teacher's)."""
    s = cfg.student
    if s.tokenizer is not None:
        return load_tokenizer(s.tokenizer, what="student.tokenizer")
    if s.new_tokenizer is not None:
        from alignkd.data.bpe import student_bpe

        folder = student_bpe(cfg.data.train, s.new_tokenizer, text_field=cfg.data.text_field, say=say)
        return load_tokenizer(str(folder), what="student.new_tokenizer")
    if s.path is None:
        return None
    try:
        return load_tokenizer(s.path, what="student")
    except ModelError as e:
        if "no tokenizer found" not in str(e):
            raise
        return None


def other_tokenizer(cfg: Config, teacher_tok, student_tok=None, say=print):
    """The student's tokenizer when it is not the teacher's (the run then pairs two tokenizations of the text);
    None when they share one, or a vocabulary over a shared range of ids."""
    tok = student_tokenizer(cfg, say) if student_tok is None else student_tok
    if tok is None or shares_vocabulary(teacher_tok, tok):
        return None
    if cfg.teacher.task != "causal_lm":
        raise ConfigError(
            f"student: its tokenizer is not the teacher's, and distilling across tokenizers needs a causal LM teacher "
            f"(teacher.task is {cfg.teacher.task}); give the student the teacher's tokenizer"
        )
    return tok


def _with_tokenizer(s, tok):
    """A ``config`` student's settings with its own tokenizer's vocabulary size and special ids."""
    import dataclasses

    given = s.config or {}
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    # A vocab_size given (a head padded past the tokenizer) stays; one too small is refused with the heads' check.
    return dataclasses.replace(s, config={**given, "vocab_size": given.get("vocab_size") or len(tok), **ids})


def load_models(
    cfg: Config, teacher_weights: bool | None = None, inputs: Inputs | None = None, student_tok: object = None
):
    """Tokenizer, frozen teacher, student, and the logit columns they share.

    Without ``teacher_weights`` the teacher is left on the meta device: its
    structure, no weights. By default that is when the run reads a teacher cache,
    or when the student is the teacher's own checkpoint trained on the ground
    truth alone (``alignkd finetune``). A student copied from the teacher still
    needs them, so the teacher is then loaded, copied from and emptied.
    ``inputs``: tokenizer and teacher already loaded. ``student_tok``: the student's own tokenizer when it is not
    the teacher's (``other_tokenizer``); the vocabulary returned is then the student's own (no logit column is
    shared), and a call without it refuses a student whose tokenizer differs.
    """
    task = cfg.teacher.task
    weights = not (cfg.teacher.cache or fine_tunes_teacher(cfg)) if teacher_weights is None else teacher_weights
    tok = (
        inputs.tokenizer
        if inputs
        else load_tokenizer(cfg.teacher.path, what="teacher", trust_remote_code=cfg.teacher.trust_remote_code)
    )
    copies_teacher = cfg.student.from_teacher is not None or (
        cfg.student.config is not None and cfg.student.init == "prune"
    )
    if inputs:
        teacher = inputs.teacher
    elif weights or copies_teacher:
        teacher = load_model(
            cfg.teacher.path,
            task=task,
            dtype=cfg.teacher.dtype,
            what="teacher",
            trust_remote_code=cfg.teacher.trust_remote_code,
        )
    else:
        teacher = load_skeleton(
            cfg.teacher.path, task=task, what="teacher", trust_remote_code=cfg.teacher.trust_remote_code
        )
    teacher = freeze(teacher)
    own = cfg.student.tokenizer or cfg.student.new_tokenizer
    s_cfg = _with_tokenizer(cfg.student, student_tok) if own and student_tok is not None else cfg.student
    student = build_student(s_cfg, teacher, task, _calibration(cfg, tok, inputs, teacher))
    if not weights:
        to_meta(teacher)  # frees the weights: the run never calls the teacher
    for model, what in ((teacher, "teacher"), (student, "student")):
        check_positions(model, cfg.data.seq_len, what)
        if task == "sequence_classification" and model.config.pad_token_id is None:
            # A classifier made from a causal LM checkpoint finds each text's last token by the pad id.
            model.config.pad_token_id = tok.pad_token_id
    if student_tok is None and other_tokenizer(cfg, tok, say=lambda _: None) is not None:
        raise ModelError(
            "teacher and student tokenizers differ: this command needs one tokenizer for both "
            "(alignkd distill pairs two tokenizations of the text with the span terms)"
        )
    return tok, teacher, student, _vocab(task, teacher, student, tok, student_tok)


def _vocab(task: str, teacher: nn.Module, student: nn.Module, tok, student_tok) -> int:
    """The logit columns the output terms read: both heads' shared ids; with a tokenizer of the student's own, its
    ids (only its ce reads its logits by id); 0 for class logits."""
    if task == "sequence_classification":
        return 0
    if student_tok is not None:
        return common_vocab(student, student, student_tok)
    return common_vocab(teacher, student, tok)


def fused_heads(cfg: Config, task, student: nn.Module, teacher: nn.Module) -> tuple[OutputHead, OutputHead] | None:
    """The two output heads when the output terms can skip the logits, else None.

    Needs ``train.fused_head``, a causal LM, every logit-reading term able to run
    fused (kl, ce; not dkd or blockwise), and both families' logits a plain head
    with the same soft-capping.

    Fused, the terms never hold ``[tokens, V]`` logits, but each walk over the
    student's head makes its logits again and pushes each output's gradient through
    the head, where on logits the step makes them once and sums the terms'
    gradients before one backward through the head. Under autocast one walk per
    micro-batch costs about what the logits do, so a run fuses when its output
    terms take one walk: one term, or the first KL term on a live teacher with the
    first CE term, which share one (``lm_head_kl_ce``); a run that needs more (a
    second KL or CE term, or KL + CE from a teacher cache, whose KL walks alone)
    keeps the logits. Float32 runs fuse whatever the number of walks: there the
    logits and their gradient are the largest tensors of the step.
    """
    kinds = [TERM_TYPES[t.type] for t in cfg.losses]
    if not cfg.train.fused_head or task.name != "causal_lm" or any(k.reads_logits and not k.fused for k in kinds):
        return None
    walks = sum(k.reads_logits for k in kinds)
    if {"kl", "ce"} <= {t.type for t in cfg.losses} and not cfg.teacher.cache:
        walks -= 1  # one KL and one CE share a walk (terms.outputs._from_one_walk)
    if cfg.train.mixed_precision != "no" and walks > 1:
        return None
    s, t = output_head(student), output_head(teacher)
    if s is None or t is None or s.softcap != t.softcap:
        return None
    return s, t
