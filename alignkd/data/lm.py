"""Documents -> token ids -> packed ``[N, seq_len]`` blocks for language modelling.

Whether each block starts with BOS is decided from what the tokenizer does
(:func:`wants_bos`), not from a list of families.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from alignkd.data.sampler import split_indices
from alignkd.data.sources import EVAL_SPLIT, read_texts
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
    lead = 0 if bos_id is None else 1
    if seq_len < 1 + lead:
        raise DataError(f"data.seq_len is {seq_len}; set it to at least {1 + lead} tokens")
    stream = array("q")  # 8 bytes per token, where a list of ints costs ~36
    for doc in token_ids:
        if not len(doc):
            continue
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
    body = seq_len - lead  # stream tokens per block
    num_blocks = len(stream) // body
    if num_blocks == 0:
        raise DataError(
            f"the text holds {len(stream)} tokens but data.seq_len is {seq_len}; lower data.seq_len or add text"
        )
    flat = torch.frombuffer(stream, dtype=torch.int64)
    blocks = flat[: num_blocks * body].view(num_blocks, body)
    if bos_id is None:
        return blocks.clone()
    return torch.cat([torch.full((num_blocks, 1), bos_id, dtype=torch.int64), blocks], dim=1)


def _eos_id(tokenizer) -> int | None:
    """EOS separates documents; BERT-like tokenizers have none and use SEP instead."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


@dataclass
class LMData:
    """Packed token blocks for language modelling."""

    train: torch.Tensor
    """``[N_train, seq_len]`` int64 token ids."""
    eval: torch.Tensor
    """``[N_eval, seq_len]`` int64; empty ``[0, seq_len]`` only when eval_fraction is 0."""


def _tokenize_bounded(texts: list[str], tokenizer, max_tokens: int | None, eos_id: int | None) -> list[list[int]]:
    """Token ids of the leading documents whose stream (with EOS) reaches ``max_tokens``; all if None."""
    if max_tokens is None:
        return tokenize_texts(texts, tokenizer)
    docs, total, step = [], 0, 1000
    for start in range(0, len(texts), step):
        for doc in tokenize_texts(texts[start : start + step], tokenizer):
            docs.append(doc)
            total += len(doc) + (eos_id is not None)
            if total >= max_tokens:
                return docs
    return docs


def _packed(
    source: str,
    tokenizer,
    seq_len: int,
    text_field: str,
    split: str,
    max_tokens: int | None = None,
    bos_id: int | None = None,
) -> torch.Tensor:
    """``source`` read, tokenised and packed -> ``[N, seq_len]``; at most ``max_tokens // seq_len`` blocks."""
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(
            f"data.max_train_tokens is {max_tokens}, below data.seq_len {seq_len}; raise it or leave it unset"
        )
    eos_id = _eos_id(tokenizer)
    ids = _tokenize_bounded(read_texts(source, text_field=text_field, split=split), tokenizer, max_tokens, eos_id)
    try:
        blocks = pack(ids, seq_len, eos_id, bos_id)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    # Cutting the packed blocks equals cutting the token stream to max_tokens first (BOS counted).
    return blocks if max_tokens is None else blocks[: max_tokens // seq_len]


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
) -> LMData:
    """Read, tokenise and pack ``train`` (and ``eval``) into ``[N, seq_len]`` blocks.

    Without ``eval``, a seeded shuffle of the train blocks holds out
    ``max(1, round(eval_fraction * N))`` of them. ``max_train_tokens`` caps the
    train token stream before packing (and before the split), to bound work.
    With ``bos_id`` (see :func:`resolve_bos`) every block starts with it; None packs text only.
    A ``datasets`` source reads split "train" for ``train`` and "validation" for ``eval``.
    """
    blocks = _packed(train, tokenizer, seq_len, text_field, "train", max_train_tokens, bos_id)
    if eval is not None:
        return LMData(train=blocks, eval=_packed(eval, tokenizer, seq_len, text_field, EVAL_SPLIT, bos_id=bos_id))
    what = f"{train} packs into {len(blocks)} block of data.seq_len={seq_len} tokens"
    train_idx, eval_idx = split_indices(len(blocks), eval_fraction, seed, what)
    return LMData(train=blocks[train_idx], eval=blocks[eval_idx])
