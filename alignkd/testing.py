"""Tiny models, a byte tokenizer and a small corpus, built offline, for tests and benchmarks.

Everything here is random and small (width 32, two blocks by default) and needs
no download: ``build`` makes a model in memory, ``save_model`` writes a model
with the byte tokenizer to a folder that ``alignkd`` (or transformers) loads as
a teacher or a student, and ``write_corpus`` writes a folder of text files.
alignkd's own tests and benchmarks use them; so may the tests of a project
built on alignkd.

Only torch, tokenizers and transformers are imported here, nothing from the
engine, the config or the CLI: the tests of those layers can lean on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<pad>", "<eos>", "[CLS]", "[SEP]", "[MASK]"]


def byte_tokenizer(*, bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + specials, so any text round-trips.

    ``bos=True`` adds ``<bos>`` after the bytes (id 261, other ids unchanged) and
    puts it before every encoded text, as Llama's and Gemma's tokenizers do.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet) + (["<bos>"] if bos else []))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
        )
        extra["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **extra,
    )


VOCAB = 272  # 261 tokens, padded like real heads (Qwen2Tokenizer adds one more)


def config(family: str, *, layers: int = 2, width: int = 32, heads: int = 4, vocab: int = VOCAB, **kw):
    """The transformers config of a tiny ``family`` model: llama, qwen2, gemma3, gpt2 or bert (``kw`` on top)."""
    common = dict(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * width,
    )
    if family == "llama":
        return LlamaConfig(
            **common,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            **kw,
        )
    if family == "qwen2":
        return Qwen2Config(
            **common,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            **kw,
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            **common,
            num_key_value_heads=max(1, heads // 2),
            head_dim=width // heads,
            max_position_embeddings=256,
            sliding_window=16,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            **kw,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            **kw,
        )
    if family == "bert":
        return BertConfig(**common, max_position_embeddings=256, pad_token_id=0, num_labels=2, **kw)
    raise ValueError(family)


def save_model(
    path: Path, family: str = "llama", *, task: str = "causal_lm", seed: int = 0, bos: bool = False, **kw
) -> Path:
    """Build a random tiny model (+ the byte tokenizer, with BOS when ``bos``) and save it to ``path``."""
    torch.manual_seed(seed)
    cfg = config(family, **kw)
    cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    model.save_pretrained(path)
    byte_tokenizer(bos=bos).save_pretrained(path)
    return path


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
)


def write_corpus(path: Path, docs: int = 12) -> Path:
    """``docs`` text files in ``path`` (created), each ``TEXT`` one to three times over."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (path / f"doc{i:02d}.txt").write_text(TEXT * (1 + i % 3))
    return path


def build(
    family: str = "llama", *, task: str = "causal_lm", seed: int = 0, attn_implementation: str | None = None, **kw
):
    """A random tiny model in memory (eval mode, so forwards are deterministic)."""
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return cls.from_config(config(family, **kw), **extra).eval()
