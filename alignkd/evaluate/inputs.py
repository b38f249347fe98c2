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
    return token_lengths(tokenizer, texts, max_tokens)[0]


def token_lengths(
    tokenizer, texts: list[str], max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_stream`'s ids ``[N]``, and the UTF-8 bytes ``[N]`` and characters ``[N]`` of text each token
    stands for: summed over any run of tokens, the length of the text they spell.

    A token's text runs from where the tokens before it end to where it ends, so text a tokenizer's offsets skip
    (trimmed spaces) goes to the next token, and tokens that share a character (the bytes of one emoji split over
    byte-level tokens) count it once, in the first. EOS between documents and other special tokens stand for none.
    Tokenizers without offsets (slow ones) count each token's decoded text.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    nbytes: list[int] = []
    nchars: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos), nbytes.append(0), nchars.append(0)
        enc = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=tokenizer.is_fast)
        ids += enc["input_ids"]
        if tokenizer.is_fast:
            done = 0
            for _, end in enc["offset_mapping"]:
                piece = text[done : max(end, done)]
                nbytes.append(len(piece.encode())), nchars.append(len(piece))
                done = max(done, end)
        else:
            for token in enc["input_ids"]:
                piece = tokenizer.decode([token])
                nbytes.append(len(piece.encode())), nchars.append(len(piece))
        if max_tokens is not None and len(ids) >= max_tokens:
            break  # long corpora: tokenise only what is scored
    cut = slice(0, max_tokens)
    return tuple(torch.tensor(x[cut], dtype=torch.long) for x in (ids, nbytes, nchars))
