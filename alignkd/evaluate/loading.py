"""Loading a model to evaluate, and what the metrics ask of a loaded model."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from alignkd.errors import EvalError
from alignkd.models.loading import looks_local


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_context(model, need: int, what: str, fix: str) -> None:
    ctx = context_length(model)
    if ctx is not None and need > ctx:
        raise EvalError(f"{what} needs {need} positions but the model's context is {ctx} tokens; {fix}")


def accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def cache_kw(model) -> str:
    # transformers 5 renamed past_key_values to cache; older releases know only the old name.
    return "cache" if accepts(model, "cache") else "past_key_values"


def out_cache(out):
    # Asking a transformers 5 output for past_key_values warns, so only fall back to it.
    return out["cache"] if "cache" in out else out.get("past_key_values")


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def check_model_path(role: str, path: str) -> None:
    """Fail early, naming ``role``, on a folder without config.json or a local path that is not there."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EvalError(f"{role}: {path} has no config.json; point it at a save_pretrained folder")
        return
    # The one rule for "local path or hub id" lives with model loading.
    if p.exists() or looks_local(path):
        raise EvalError(f"{role}: model folder not found: {path}")


def load(role: str, path: str, dtype: str, device: str):
    """``(model, tokenizer)`` in eval mode on ``device``: a sequence classifier when its config says so, else a causal
    LM."""
    from transformers import AutoConfig

    from alignkd.display import hf_bars_hidden
    from alignkd.models import ModelError, load_model, load_tokenizer

    check_model_path(role, path)
    with hf_bars_hidden():  # HF's loading bars would break into our progress display
        try:
            config = AutoConfig.from_pretrained(path)
            classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
            tokenizer = load_tokenizer(path, what=role)
            model = load_model(
                path, task="sequence_classification" if classifier else "causal_lm", dtype=dtype, what=role
            )
        except ModelError as e:
            raise EvalError(str(e)) from None
        except (OSError, ValueError) as e:
            raise EvalError(f"{role}: could not load {path!r} ({str(e).strip().splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer
