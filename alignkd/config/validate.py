"""Checks across fields and sections; each term type checks its own fields (``TermConfig.check``)."""

from __future__ import annotations

from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from alignkd.align.tasks import TASKS
from alignkd.align.weighting import WEIGHTINGS
from alignkd.checks import one_of
from alignkd.errors import ConfigError
from alignkd.models.adapters import PEFT_METHODS
from alignkd.terms import TERM_TYPES, check_pairing, role

PLACEMENTS = ("replicate", "shard")
"""Values of ``teacher.placement``."""
SOURCES = ("dataset", "student", "teacher")
"""Where a micro-batch may come from (``generation.sources``)."""
OPTIMIZERS = ("adamw", "adafactor")
"""Values of ``train.optimizer``."""
TRACKERS = ("tensorboard", "wandb", "mlflow", *sorted(set(LOGGER_TYPE_TO_CLASS) - {"tensorboard", "wandb", "mlflow"}))
"""Values of ``train.report_to``: the experiment trackers Accelerate knows."""


def validate(cfg) -> None:
    """Check values and cross-field rules; raise ``ConfigError`` naming the first bad field. Changes nothing.

    Defaults that depend on other fields (term names, ``~`` in paths) are filled
    by ``config.resolve.resolve`` first.
    """
    from alignkd.align.blocks import check_selection
    from alignkd.data import BOS_SETTINGS
    from alignkd.precision import DTYPE_NAMES

    if not cfg.teacher.path:
        raise ConfigError("teacher.path: required (a local model folder or a hub id)")
    one_of(cfg.teacher.dtype, ("auto", *DTYPE_NAMES), "teacher.dtype")
    one_of(cfg.student.dtype, ("auto", *DTYPE_NAMES), "student.dtype")
    one_of(cfg.teacher.task, list(TASKS), "teacher.task")
    one_of(cfg.teacher.placement, PLACEMENTS, "teacher.placement")
    check_selection(cfg.student)  # first: a select beside a path or config gets its own line
    chosen = [k for k in ("path", "from_teacher", "config") if getattr(cfg.student, k) is not None]
    if len(chosen) != 1:
        raise ConfigError(
            "student: set exactly one of path, from_teacher or config"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    one_of(cfg.student.init, ("random", "prune"), "student.init")
    one_of(cfg.student.importance, ("activation", "weight"), "student.importance")
    if cfg.student.tokenizer is not None and cfg.student.new_tokenizer is not None:
        raise ConfigError("student: set tokenizer (an existing one) or new_tokenizer (one trained here), not both")
    _check_own_tokenizer(cfg)
    _check_peft(cfg)
    if not cfg.data.train:
        raise ConfigError("data.train: required (a text file, folder, JSONL, CSV or datasets name)")
    if cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len: must be at least 2")
    one_of(cfg.data.bos, BOS_SETTINGS, "data.bos")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(
            f"data.eval_fraction: {cfg.data.eval_fraction:g} is outside [0, 1); "
            "set the share of training blocks held out, e.g. 0.05"
        )
    _check_augment(cfg)
    _check_losses(cfg)
    _check_cache(cfg)
    _check_generation(cfg)
    one_of(cfg.weighting.strategy, list(WEIGHTINGS), "weighting.strategy")
    if cfg.weighting.every < 1:
        raise ConfigError("weighting.every: must be >= 1")
    if cfg.weighting.strategy == "ratio" and not any(role(loss.type) == "output" for loss in cfg.losses):
        raise ConfigError(
            "weighting.strategy: ratio scales each feature term to the first kl or dkd term's value, "
            "and losses has none; "
            "add {type: kl} or choose static, gradnorm or uncertainty"
        )
    _check_train(cfg.train)


def _check_train(t) -> None:
    from alignkd.precision import MIXED_PRECISION

    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be >= 1")
    one_of(t.mixed_precision, ("auto", *MIXED_PRECISION), "train.mixed_precision")
    one_of(t.optimizer, OPTIMIZERS, "train.optimizer")
    if t.max_bad_steps < 1:
        raise ConfigError("train.max_bad_steps: must be >= 1")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError("train.max_minutes: must be > 0 (or null for no time limit)")
    if t.lr <= 0:
        raise ConfigError("train.lr: must be > 0")
    report = t.report_to or []  # None: tensorboard when installed (engine.trackers)
    if "none" in report:
        raise ConfigError("train.report_to: none means no tracker; give none alone, or only the trackers")
    for i, name in enumerate(report):
        one_of(name, TRACKERS, f"train.report_to[{i}]")


def _check_losses(cfg) -> None:
    if not cfg.losses:
        raise ConfigError("losses: add at least one term, e.g. [{type: kl}]")
    for i, loss in enumerate(cfg.losses):
        where = f"losses[{i}]"
        one_of(loss.type, list(TERM_TYPES), f"{where}.type")
        if not isinstance(loss, TERM_TYPES[loss.type].config):
            raise ConfigError(
                f"{where}: type '{loss.type}' needs a {TERM_TYPES[loss.type].config.__name__}, "
                f"got a {type(loss).__name__}"
            )
        loss.check(where)
        if cfg.weighting.strategy in ("gradnorm", "uncertainty") and loss.weight == 0:
            raise ConfigError(
                f"{where}.weight: 0 under {cfg.weighting.strategy} weighting would be learned away from 0; "
                "remove the term instead"
            )
    # Names must be unique (resolve() gave the unnamed terms unused ones).
    used: set[str] = set()
    for i, loss in enumerate(cfg.losses):
        if loss.name in used:
            raise ConfigError(f"losses[{i}].name: '{loss.name}' is used by two terms; names must be unique")
        used.add(loss.name)


def _check_cache(cfg) -> None:
    t = cfg.teacher
    if t.cache_top_k < 1:
        raise ConfigError("teacher.cache_top_k: must be >= 1")
    one_of(t.cache_dtype, ("bfloat16", "float16", "float32"), "teacher.cache_dtype")
    if t.cache is None:
        return
    if t.task != "causal_lm":
        raise ConfigError(
            f"teacher.cache: a teacher cache holds causal-LM outputs; teacher.task is {t.task}: remove teacher.cache"
        )
    for i, loss in enumerate(cfg.losses):
        if not TERM_TYPES[loss.type].cached:
            able = ", ".join(k for k, v in TERM_TYPES.items() if v.cached)
            raise ConfigError(
                f"losses[{i}]: the {loss.type} term needs the live teacher, not teacher.cache (cached terms: {able}); "
                "remove the term or teacher.cache"
            )


def _check_generation(cfg) -> None:
    g = cfg.generation
    if not g.sources:
        raise ConfigError("generation.sources: give at least one source, e.g. {dataset: 1}")
    for name, p in g.sources.items():
        one_of(name, SOURCES, "generation.sources")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ConfigError(f"generation.sources.{name}: expected a probability in [0, 1], got {p!r}")
    total = sum(g.sources.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"generation.sources: the probabilities sum to {total:g}; they must sum to 1 "
            f"(e.g. {{dataset: 0.5, student: 0.5}})"
        )
    if g.student_schedule is not None:
        s = g.student_schedule
        s.check("generation.student_schedule")
        for k in ("start", "end"):
            if not 0 <= getattr(s, k) <= 1:
                raise ConfigError(f"generation.student_schedule.{k}: {getattr(s, k):g} is not a probability in [0, 1]")
    if g.prompt_tokens < 1:
        raise ConfigError("generation.prompt_tokens: must be >= 1")
    if g.max_new_tokens < 1:
        raise ConfigError("generation.max_new_tokens: must be >= 1")
    if g.temperature < 0:
        raise ConfigError("generation.temperature: must be >= 0 (0 is greedy)")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p: {g.top_p:g} is outside (0, 1]")
    if g.eval_prompts < 0:
        raise ConfigError("generation.eval_prompts: must be >= 0 (0 skips the generation metrics)")
    if g.teacher_top_k < 0:
        raise ConfigError("generation.teacher_top_k: must be >= 0 (0: run the teacher on its samples)")
    if g.teacher_top_k and not g.sources.get("teacher", 0.0) > 0:
        raise ConfigError(
            "generation.teacher_top_k: keeps the teacher's top-k with its samples, and generation.sources has no "
            "teacher share; add one (e.g. {dataset: 0.5, teacher: 0.5}) or remove teacher_top_k"
        )
    if g.teacher_top_k:
        # The samples keep the teacher's top-k only: no states for the feature terms, nothing for DKD's full logits.
        def reads_top_k(t) -> bool:
            return not t.uses_teacher or (t.cached and t.reads_logits)

        for i, loss in enumerate(cfg.losses):
            if loss.type in TERM_TYPES and not reads_top_k(TERM_TYPES[loss.type]):
                able = ", ".join(k for k, v in TERM_TYPES.items() if reads_top_k(v))
                raise ConfigError(
                    f"losses[{i}]: the {loss.type} term needs the live teacher on its samples, not the top-k kept with "
                    f"them (terms that read it: {able}); remove the term or generation.teacher_top_k"
                )
    if not g.generates and not g.eval_prompts:
        return
    if cfg.teacher.task != "causal_lm":
        raise ConfigError(
            f"generation: generated text is causal-LM text; teacher.task is {cfg.teacher.task}: "
            "use sources {dataset: 1} and eval_prompts 0"
        )
    if cfg.teacher.cache is not None and g.generates:
        raise ConfigError(
            "generation.sources: the student and teacher sources need the live teacher to score new text, "
            "not teacher.cache; remove teacher.cache or use {dataset: 1}"
        )
    if cfg.teacher.cache is not None and g.eval_prompts:
        raise ConfigError(
            "generation.eval_prompts: the generation metrics need the live teacher to continue and score text, "
            "not teacher.cache; set it to 0 or remove teacher.cache"
        )
    if (g.prompts is None or g.eval_prompts) and g.prompt_tokens >= cfg.data.seq_len:
        raise ConfigError(
            f"generation.prompt_tokens: a {g.prompt_tokens}-token prompt leaves nothing of a {cfg.data.seq_len}-token "
            "training block; set it below data.seq_len, or give generation.prompts"
        )


def _check_own_tokenizer(cfg) -> None:
    """``student.tokenizer`` / ``new_tokenizer``: a new causal-LM student; a trained one (always another tokenizer)
    takes only the terms that work across tokenizers, checked here before it is trained."""
    s = cfg.student
    if s.tokenizer is not None and s.new_tokenizer is not None:
        raise ConfigError("student: set tokenizer (an existing one) or new_tokenizer (one trained here), not both")
    own = "tokenizer" if s.tokenizer is not None else "new_tokenizer" if s.new_tokenizer is not None else None
    if own is None:
        return
    if s.config is None or s.init != "random":
        raise ConfigError(
            f"student.{own}: only a student built with new weights (student.config, init: random) takes another "
            "tokenizer; a student copied from the teacher keeps its embedding, and a path student its own tokenizer"
        )
    if s.new_tokenizer is not None and s.new_tokenizer < 300:
        raise ConfigError(
            f"student.new_tokenizer: {s.new_tokenizer} tokens leaves almost no merges beyond the 256 bytes; "
            "use 300 or more"
        )
    if cfg.teacher.task != "causal_lm":
        raise ConfigError(
            f"student.{own}: distilling across tokenizers needs a causal LM teacher (teacher.task is "
            f"{cfg.teacher.task}); leave student.{own} out"
        )
    if own == "new_tokenizer":  # a tokenizer trained here is never the teacher's
        check_pairing([t.type for t in cfg.losses], paired=True)


def _check_peft(cfg) -> None:
    """``student.peft``: a known method and sizes, on a student that already knows something."""
    p, s = cfg.student.peft, cfg.student
    if p is None:
        return
    one_of(p.method, list(PEFT_METHODS), "student.peft.method")
    if p.r < 1:
        raise ConfigError("student.peft.r: must be >= 1 (the adapters' rank, e.g. 8)")
    if not p.alpha > 0:
        raise ConfigError("student.peft.alpha: must be > 0 (e.g. twice r)")
    if not 0 <= p.dropout < 1:
        raise ConfigError(f"student.peft.dropout: {p.dropout:g} is outside [0, 1)")
    if not p.target_modules:
        raise ConfigError("student.peft.target_modules: empty; name the layers to adapt, e.g. [q_proj, v_proj]")
    if s.config is not None and s.init == "random":
        raise ConfigError(
            "student.peft: adapters learn a small change to weights that already know something, and a student with "
            "init: random has new weights; use student.path, student.from_teacher or init: prune"
        )
    if cfg.teacher.task != "causal_lm":
        raise ConfigError(
            f"student.peft: adapters are for causal LM students (teacher.task is {cfg.teacher.task}); leave it out"
        )
    if s.freeze:
        raise ConfigError("student.freeze: with student.peft only the adapters train already; leave freeze out")


def _check_augment(cfg) -> None:
    d = cfg.data
    if d.augment < 0:
        raise ConfigError("data.augment: must be >= 0 (0: no augmented variants)")
    if not 0 < d.augment_p <= 1:
        raise ConfigError(f"data.augment_p: {d.augment_p:g} is outside (0, 1]; TinyBERT replaces 0.4 of the tokens")
    if d.augment_k < 1:
        raise ConfigError("data.augment_k: must be >= 1")
    if d.unlabelled_rows is not None and d.unlabelled_rows < 1:
        raise ConfigError("data.unlabelled_rows: must be >= 1 (or null for every snippet)")
    for key in ("augment", "unlabelled"):
        if getattr(d, key) and cfg.teacher.task != "sequence_classification":
            raise ConfigError(
                f"data.{key}: the teacher labels these rows with its classes, and teacher.task is {cfg.teacher.task}; "
                f"remove data.{key} (for a language model, see generation.sources)"
            )
        if not getattr(d, key):
            continue
        if cfg.teacher.cache:
            raise ConfigError(
                f"data.{key}: the teacher labels these rows as the steps draw them, and teacher.cache holds its "
                f"outputs on the training examples only; remove teacher.cache or data.{key}"
            )
        if not any(TERM_TYPES[t.type].uses_teacher for t in cfg.losses if t.type in TERM_TYPES):
            raise ConfigError(
                f"data.{key}: the teacher labels these rows in the step, and no term runs it; "
                "add an output term such as {type: kl}"
            )
