"""What models are evaluated on: held-out text, labelled examples, token streams."""

from __future__ import annotations

from pathlib import Path

import torch

from alignkd.assets.store import cache_dir
from alignkd.errors import EvalError


def packaged(relative: str, message: str) -> str:
    """A packaged asset under ``alignkd.assets.cache_dir()``; ``message`` is the error when it is not there."""
    path = Path(cache_dir()) / relative
    if not path.exists():
        raise EvalError(message)
    return str(path)


def read_held_out(source: str) -> list[str]:
    """Documents of held-out text, through :func:`alignkd.data.read_texts`."""
    from alignkd.data import DataError, read_texts

    try:
        return read_texts(source)
    except DataError as e:
        raise EvalError(str(e)) from None


def read_labelled(source: str) -> tuple[list[str], list[str], list[str]]:
    """Texts, their label names and the sorted class names from a CSV/JSONL with text,label columns."""
    from alignkd.data import DataError
    from alignkd.data import read_labelled as read

    try:
        texts, ids, names = read(source)
    except DataError as e:
        # data.py names the training config's fields; here the fix is the file itself.
        hint = "; the labelled data needs text and label columns"
        raise EvalError(str(e).replace("; set data.text_field", hint).replace("; set data.label_field", hint)) from None
    return texts, [names[i] for i in ids], names


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenised and joined with EOS between them, cut to ``max_tokens``: ``-> [N]`` int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if max_tokens is not None and len(ids) >= max_tokens:
            break  # long corpora: tokenise only what is scored
    return torch.tensor(ids[:max_tokens], dtype=torch.long)
