"""``--quick``'s stand-ins: a tiny random teacher of the real one's family and depth, a byte tokenizer, generated text.

Nothing here reads the packaged assets' weights or text, so a quick study runs
on a machine without them (the test suite's). The stand-in keeps what the
variants' settings depend on: the family, the number of blocks (explicit layer
maps stay valid) and the attention head counts (head ratios stay valid); the
width shrinks to 32-64, and a variant's ``student.config`` widths shrink by the
same factor.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from alignkd.errors import ConfigError

SPECIALS = ["<pad>", "<eos>", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 272  # 261 tokens, padded like real output heads
POSITIONS = 256
WIDTH_KEYS = ("hidden_size", "intermediate_size", "head_dim")
"""``student.config`` keys that scale with the teacher's width."""
KEPT = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "hidden_act",
)
"""The real teacher's config.json keys the stand-in copies."""
DEFAULT_SHAPE = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
}


@dataclass
class StandIns:
    """Where the stand-ins were written, and the widths of the real teacher and of its stand-in."""

    teacher: Path
    """HF folder of the stand-in teacher (a causal LM) and its byte tokenizer."""
    text_train: Path
    """Folder of generated .txt documents: ``${assets.sotu}`` under --quick."""
    text_heldout: Path
    """Generated held-out documents: ``${assets.moby_dick}``."""
    sentiment: Path
    """train.csv, dev.csv, test.csv (text,label; positive or negative): ``${assets.sentiment}``."""
    real: dict
    """The real teacher's shape (config.json keys)."""
    tiny: dict
    """The stand-in's shape (same keys)."""


def byte_tokenizer():
    """Byte-level tokenizer: 256 byte tokens + specials, so any text round-trips (as tests/tiny.py's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def real_shape(folder: Path | None, fallback: dict) -> dict:
    """The teacher's shape from its config.json when it is on this machine, else ``fallback`` (the study's
    ``quick.teacher``).

    Read through ``AutoConfig``, so families that spell the keys otherwise (GPT-2's ``n_layer``) give the same names.
    """
    if folder is not None and (folder / "config.json").is_file():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError):
            cfg = None
        if cfg is not None:
            keys = (*KEPT, "hidden_size", "intermediate_size", "head_dim")
            return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}
    return {**DEFAULT_SHAPE, **fallback}


def tiny_shape(real: dict) -> dict:
    """Family, depth and head counts of ``real``; head_dim 4-12 (even, for rotary), so the width is 32-64 for 3-16
    heads."""
    heads = int(real.get("num_attention_heads") or DEFAULT_SHAPE["num_attention_heads"])
    head_dim = 4 * max(1, round(12 / heads))
    hidden = heads * head_dim
    real_hidden = real.get("hidden_size") or DEFAULT_SHAPE["hidden_size"]
    inter = real.get("intermediate_size") or 2 * real_hidden
    tiny = {k: real[k] for k in KEPT if k in real}
    tiny.setdefault("model_type", "llama")
    tiny.update(hidden_size=hidden, head_dim=head_dim, intermediate_size=max(2, round(hidden * inter / real_hidden)))
    return tiny


def shrink(student_config: dict, real: dict, tiny: dict) -> dict:
    """A ``student.config`` for the stand-in: each width key scaled by tiny/real (head_dim kept even), the rest as
    given."""
    out = dict(student_config)
    real_head = real.get("head_dim") or real.get("hidden_size", 0) // max(1, real.get("num_attention_heads", 1))
    for key in WIDTH_KEYS:
        if key not in out:
            continue
        base = real_head if key == "head_dim" else real.get(key)
        if not base:
            raise ConfigError(
                f"student.config.{key}: --quick cannot scale it: the teacher's config gives no {key}; "
                "add it under quick.teacher"
            )
        value = out[key] * tiny[key] / base
        out[key] = max(2, 2 * round(value / 2)) if key == "head_dim" else max(2, round(value))
    return out


def build(folder: Path, real: dict, seed: int = 0) -> StandIns:
    """Write the stand-in teacher (a causal LM, as the packaged one), text and sentiment CSVs under ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = tiny_shape(real)
    folder.mkdir(parents=True, exist_ok=True)
    teacher = folder / "teacher"
    cfg = AutoConfig.for_model(
        **tiny, vocab_size=VOCAB, max_position_embeddings=POSITIONS, pad_token_id=0, eos_token_id=1, bos_token_id=1
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    rng = random.Random(seed)
    text_train, text_heldout = folder / "text" / "train", folder / "text" / "heldout"
    for where, docs in ((text_train, 16), (text_heldout, 4)):
        where.mkdir(parents=True, exist_ok=True)
        for i in range(docs):
            (where / f"doc{i:02d}.txt").write_text(_document(rng, 40))
    sentiment = folder / "sentiment"
    sentiment.mkdir(exist_ok=True)
    for split, rows in (("train", 96), ("dev", 32), ("test", 32)):
        _write_reviews(sentiment / f"{split}.csv", rng, rows)
    return StandIns(teacher, text_train, text_heldout, sentiment, real, tiny)


# Generated text: a small grammar, so a few steps of training already lower the loss.
SUBJECTS = ["the whale", "the captain", "a sailor", "the ship", "the harpoon", "the sea", "an old man", "the crew"]
VERBS = ["follows", "watches", "breaks", "finds", "carries", "remembers", "calls", "leaves"]
OBJECTS = ["the rope", "a storm", "the deck", "the island", "a letter", "the mast", "the harbour", "a lantern"]
ENDINGS = ["at dawn", "in silence", "again", "before the night", "with care", "for the last time"]
GOOD = [
    "a warm and clever film",
    "wonderful acting",
    "a delight from start to end",
    "sharp, funny and moving",
    "the best of the year",
]
BAD = [
    "a dull and tired film",
    "clumsy acting",
    "a bore from start to end",
    "flat, slow and empty",
    "the worst of the year",
]


def _document(rng: random.Random, sentences: int) -> str:
    lines = [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
        for _ in range(sentences)
    ]
    return " ".join(lines) + "\n"


def _write_reviews(path: Path, rng: random.Random, rows: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            good = i % 2 == 0
            writer.writerow(
                [
                    f"{rng.choice(GOOD if good else BAD)}, {rng.choice(OBJECTS)} aside",
                    "positive" if good else "negative",
                ]
            )
