"""Documents -> token ids -> packed ``[N, seq_len]`` blocks for language modelling.

Whether each block starts with BOS is decided from what the tokenizer does
(:func:`wants_bos`), not from a list of families.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from alignkd.data.blocks import Blocks, block_count
from alignkd.data.sampler import split_indices
from alignkd.data.sources import EVAL_SPLIT, iter_pieces, source_files
from alignkd.data.tokens import cached_stream, memory_stream, wants_cache
from alignkd.errors import DataError

# data.bos: auto (what the tokenizer does, see wants_bos), always, never.
BOS_SETTINGS = ("auto", "always", "never")


def wants_bos(tokenizer) -> bool:
    """True when the tokenizer puts its BOS first in what it encodes, so its model expects one there.

    Decided from what the tokenizer does, not from a list of families: Llama,
    Gemma and Mistral tokenizers add ``<bos>``; GPT-2 and SmolLM2 ones have a BOS
    token but do not add it, and BERT-like ones have none.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("Hello world", add_special_tokens=True, verbose=False)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def resolve_bos(setting: str, tokenizer) -> int | None:
    """The BOS id each packed block starts with, or None, for ``data.bos`` = auto, always or never."""
    if setting == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if setting == "always":
        if bos is None:
            raise DataError("data.bos is always but the tokenizer has no BOS token; set data.bos to never or auto")
        return bos
    if setting != "auto":
        raise DataError(f"data.bos is {setting!r}; set it to one of {', '.join(BOS_SETTINGS)}")
    return bos if wants_bos(tokenizer) else None


def tokenize_texts(texts: list[str], tokenizer, *, batch: int = 1000) -> list[list[int]]:
    """Token ids per text, without special tokens (packing adds BOS and EOS itself)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        # verbose=False: documents longer than model_max_length are expected here.
        out = tokenizer(
            texts[start : start + batch], add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        ids += [list(x) for x in out["input_ids"]]
    return ids


def pack(token_ids: list[list[int]], seq_len: int, eos_id: int | None, bos_id: int | None = None) -> torch.Tensor:
    """Concatenate documents (``eos_id`` after each) and cut into blocks: ``-> [num_blocks, seq_len]`` int64.

    With ``bos_id``, each block is ``bos_id`` then the next ``seq_len - 1`` tokens
    of the stream, so a block that begins mid-document still starts the way the
    model saw every text in pre-training. The tail shorter than a block is dropped.
    """
    stream = array("i")
    for doc in token_ids:
        if not len(doc):
            continue
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
    flat = np.frombuffer(stream, dtype=np.int32)
    return Blocks(flat, seq_len, bos_id, block_count(len(flat), seq_len, bos_id)).tensor()


def _eos_id(tokenizer) -> int | None:
    """EOS separates documents; BERT-like tokenizers have none and use SEP instead."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


@dataclass
class LMData:
    """Packed token blocks for language modelling."""

    train: torch.Tensor | Blocks
    """``[N_train, seq_len]`` int64 token ids: a tensor, or :class:`Blocks` read from a token cache file."""
    eval: torch.Tensor | Blocks
    """``[N_eval, seq_len]`` int64; empty ``[0, seq_len]`` only when eval_fraction is 0."""


# data.token_cache: auto (cache local sources of tokens.AUTO_MIN_BYTES or more), off (tokenise in memory), or a folder.
TOKEN_CACHE_SETTINGS = ("auto", "off")


def _stream(source: str, tokenizer, text_field: str, split: str, max_tokens: int | None, setting: str, say):
    """``source``'s token stream (``[L]`` int32) and whether it came from a cache file."""
    eos_id = _eos_id(tokenizer)
    files = source_files(source)
    pieces = partial(iter_pieces, source, text_field=text_field, split=split)  # read anew by each call
    if not wants_cache(files, setting):
        return memory_stream(pieces(), tokenizer, eos_id, max_tokens), False
    return cached_stream(
        source,
        files,
        tokenizer,
        eos_id,
        pieces,
        text_field=text_field,
        setting=setting,
        max_tokens=max_tokens,
        say=say,
    ), True


def _blocks(source, tokenizer, seq_len, text_field, split, max_tokens, bos_id, setting, say) -> torch.Tensor | Blocks:
    """``source`` tokenised and packed -> ``[N, seq_len]``; at most ``max_tokens // seq_len`` blocks.

    A tensor when tokenised in memory; :class:`Blocks` over the file when cached.
    """
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(
            f"data.max_train_tokens is {max_tokens}, below data.seq_len {seq_len}; raise it or leave it unset"
        )

    def count(tokens: int) -> int:
        try:
            return block_count(tokens, seq_len, bos_id, max_tokens)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None

    count(seq_len)  # a seq_len too short for BOS fails before any tokenising
    stream, cached = _stream(source, tokenizer, text_field, split, max_tokens, setting, say)
    blocks = Blocks(stream, seq_len, bos_id, count(len(stream)))
    return blocks if cached else blocks.tensor()


def build_lm_data(
    train: str,
    tokenizer,
    *,
    seq_len: int,
    eval: str | None = None,
    eval_fraction: float = 0.05,
    text_field: str = "text",
    max_train_tokens: int | None = None,
    seed: int = 0,
    bos_id: int | None = None,
    token_cache: str = "auto",
    say: Callable[[str], None] = lambda _: None,
) -> LMData:
    """Read, tokenise and pack ``train`` (and ``eval``) into ``[N, seq_len]`` blocks.

    Without ``eval``, a seeded shuffle of the train blocks holds out
    ``max(1, round(eval_fraction * N))`` of them. ``max_train_tokens`` caps the
    train token stream before packing (and before the split), to bound work.
    With ``bos_id`` (see :func:`resolve_bos`) every block starts with it; None packs text only.
    A ``datasets`` source reads split "train" for ``train`` and "validation" for ``eval``.

    ``token_cache`` (``data.token_cache``): "auto" tokenises a local source of
    at least ``tokens.AUTO_MIN_BYTES`` (16 MiB) once into a token file beside it (see
    :mod:`~alignkd.data.tokens`) and returns :class:`Blocks` read from it; "off"
    tokenises in memory; any other value is the folder for the token files
    (used whatever the size). Either way the blocks are the same. ``say`` gets
    a line when a cache file is made or reused.
    """
    setting = token_cache if token_cache in TOKEN_CACHE_SETTINGS else os.path.expanduser(token_cache)
    blocks = _blocks(train, tokenizer, seq_len, text_field, "train", max_train_tokens, bos_id, setting, say)
    if eval is not None:
        held = _blocks(eval, tokenizer, seq_len, text_field, EVAL_SPLIT, None, bos_id, setting, say)
        return LMData(train=blocks, eval=held)
    what = f"{train} packs into {len(blocks)} block of data.seq_len={seq_len} tokens"
    train_idx, eval_idx = split_indices(len(blocks), eval_fraction, seed, what)
    if isinstance(blocks, Blocks):  # views: a cached corpus is never copied whole
        return LMData(train=blocks.select(train_idx), eval=blocks.select(eval_idx))
    return LMData(train=blocks[train_idx], eval=blocks[eval_idx])
