"""Loading teachers, students and tokenizers through the matching ``AutoModel*`` class."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from alignkd.display import DEBUG
from alignkd.errors import ModelError
from alignkd.models.adapters import adapter_base, is_adapter_folder, merge_adapter_folder
from alignkd.precision import DTYPES, default_device, resolve_dtype

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "masked_lm": AutoModelForMaskedLM,
}


def looks_local(path: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """True when ``path`` can only mean a local file or folder, never a hub id.

    A hub id is ``name`` or ``owner/name``; anything else that does not exist is a
    missing local path: absolute, starting with "." or "~", more than one "/", a
    backslash (os.sep) on Windows, or ending in one of ``file_suffixes`` (the data
    readers pass their file kinds, so a typo'd ``corpus.jsonl`` is not sent to the hub).
    """
    return (
        os.path.isabs(path)
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
        or path.lower().endswith(file_suffixes)
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_source(path: str, what: str, tokenizer: bool = False) -> None:
    """A local ``path`` must be a ``save_pretrained`` folder: of a model, or (``tokenizer``) of a tokenizer alone."""
    p = Path(path).expanduser()
    if looks_local(path) and not p.exists():
        raise ModelError(f"{what}: {'folder' if 'tokenizer' in what else 'model folder'} not found: {path}")
    files = ("config.json", *TOKENIZER_FILES) if tokenizer else ("config.json",)
    if p.is_dir() and not any((p / f).is_file() for f in files):
        raise ModelError(f"{what}: {path} has no {' or '.join(files[:2])}; point it at a save_pretrained folder")


def _offline_miss(path: str, what: str) -> ModelError | None:
    """The error for a hub id that is not cached while HF_HUB_OFFLINE forbids the download, else None."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or Path(path).expanduser().exists():
        return None
    try:
        cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid repo id either
        cached = False
    if not cached:
        return ModelError(
            f"{what}: {path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it, or give a local model folder"
        )
    return None


def load_model(
    path: str,
    *,
    task: str,
    dtype: str = "float32",
    what: str = "model",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a pretrained model for ``task`` from a folder or hub id; a PEFT adapter folder is loaded as its base
    model with the adapter folded in."""
    if is_adapter_folder(path):
        base = load_model(
            adapter_base(path), task=task, dtype=dtype, what=f"{what} (the adapter's base)",
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
        )  # fmt: skip
        return merge_adapter_folder(base, path)
    _check_source(path, what)
    kwargs = {"dtype": DTYPES[resolve_dtype(dtype, default_device())], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with _load_report_hidden():
            model, info = AUTO_CLASSES[task].from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as e:
        raise _offline_miss(path, what) or ModelError(
            f"{what}: could not load {path!r} ({str(e).splitlines()[0]})"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        print(_missing_line(model, missing, what), file=sys.stderr)
    return model


@contextlib.contextmanager
def _load_report_hidden():
    """transformers' load report (a table of missing and unexpected weights, logged as a warning) stays hidden unless
    ``--debug``: ``load_model`` says what matters of it in one line."""
    if os.environ.get(DEBUG):
        yield
        return
    logger = logging.getLogger("transformers.modeling_utils")
    # A filter, not a level: transformers runs extra checks (and warns from them) when this logger's level is set.
    report = _DropLoadReport()
    logger.addFilter(report)
    try:
        yield
    finally:
        logger.removeFilter(report)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _missing_line(model, missing: list[str], what: str) -> str:
    """One line for weights the checkpoint lacks, which transformers initialised randomly."""
    base = getattr(model, "base_model_prefix", "")
    head = [k for k in missing if not (base and k.startswith(f"{base}."))]
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    labels = getattr(model.config, "num_labels", None)
    if head == missing and any(hasattr(model, name) for name in ("score", "classifier")):
        return f"{what}: a new {labels}-class head ({shown}), initialised randomly: the checkpoint has none"
    return (
        f"{what}: {len(missing)} weights not in the checkpoint, initialised randomly ({shown}); "
        "alignkd --debug shows transformers' load report"
    )


def load_skeleton(path: str, *, task: str, what: str = "model", trust_remote_code: bool = False):
    """The model of ``path`` on the meta device: its modules and config, no weights read or allocated."""
    import torch
    from transformers import AutoConfig

    _check_source(path, what)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _offline_miss(path, what) or ModelError(
            f"{what}: could not load {path!r} ({str(e).splitlines()[0]})"
        ) from None
    with torch.device("meta"):
        return AUTO_CLASSES[task].from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, *, what: str = "model", trust_remote_code: bool = False):
    _check_source(path, what, tokenizer=True)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _offline_miss(path, what) or ModelError(
            f"{what}: no tokenizer found for {path!r} ({str(e).splitlines()[0]})"
        ) from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # packing never pads; this only helps evaluation batches
    return tok


def shares_vocabulary(teacher_tok, student_tok) -> bool:
    """The two tokenizers give the same id to the same token over the ids both have: one tokenizer, or one that
    extends the other (added tokens, a vocabulary padded in the same family). Distillation then compares the
    models' logits directly over the shared ids."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return True
    small, big = (tv, sv) if len(tv) <= len(sv) else (sv, tv)
    return all(big.get(token) == i for token, i in small.items())


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Teacher and student must tokenise the same way: same vocabulary, same ids."""
    if student_tok is None:
        return
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        raise ModelError(
            f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens; {only_t} only in the teacher, "
            f"{only_s} only in the student): distillation needs a shared tokenizer"
        )


def common_vocab(teacher, student, tokenizer) -> int:
    """Number of logit columns both models share.

    Output heads are often padded past the tokenizer (e.g. 151936 vs 152064 rows);
    such heads meet on the first ``min(V_t, V_s)`` ids. Anything smaller than the
    tokenizer is a real mismatch.
    """
    vt = (
        teacher.get_output_embeddings().weight.shape[0]
        if teacher.get_output_embeddings() is not None
        else teacher.config.vocab_size
    )
    vs = (
        student.get_output_embeddings().weight.shape[0]
        if student.get_output_embeddings() is not None
        else student.config.vocab_size
    )
    need = len(tokenizer)
    if min(vt, vs) < need:
        raise ModelError(
            f"vocabulary mismatch: teacher head has {vt} rows, student head {vs}, tokenizer {need} tokens; "
            "both heads must cover the tokenizer"
        )
    return min(vt, vs)


def max_positions(model) -> int | None:
    """The most positions the model reads (its position table), or None when its config sets none."""
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def check_positions(model, seq_len: int, what: str) -> None:
    """``data.seq_len`` must fit the model's position table (``max_position_embeddings``)."""
    most = getattr(model.config, "max_position_embeddings", None)
    if most is not None and seq_len > most:
        raise ModelError(
            f"data.seq_len {seq_len} is beyond the {what}'s maximum of {most} positions; "
            f"set data.seq_len to {most} or less"
        )
