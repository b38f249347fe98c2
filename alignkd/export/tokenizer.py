"""A Hugging Face tokenizer as llama.cpp's GGUF tokenizer metadata: tokens, their types, merges and special ids.

Only byte-level BPE tokenizers (GPT-2's kind, which SmolLM2 and alignkd's test
byte tokenizer are) carry over exactly: llama.cpp re-implements the tokenizer
from the metadata, and its ``gpt2`` model with a named pre-tokenizer splits and
merges text as the Hugging Face tokenizer does. Any other kind is refused in one
line rather than written as a file that tokenizes differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from alignkd.errors import ExportError

# The Hugging Face pre-tokenizers llama.cpp has a twin for, keyed by that twin's name (``tokenizer.ggml.pre``).
# Each is a list of (type, settings that change the split) as tokenizer.json writes them.
PRE_TOKENIZERS = {
    "gpt-2": [("ByteLevel", {"add_prefix_space": False, "use_regex": True})],
    "smollm": [
        ("Digits", {"individual_digits": True}),
        ("ByteLevel", {"add_prefix_space": False, "use_regex": True}),
    ],
}
SUPPORTED = "byte-level BPE tokenizers (GPT-2's kind, as SmolLM2's)"

# GGUF token types (llama.cpp's llama_token_type); the gguf package's TokenType has the same values.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    """What llama.cpp reads to rebuild the tokenizer; every list is in id order, ``len(tokens)`` = the model's vocab."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    """BPE merges, highest priority first, each ``"left right"``."""
    pre: str
    """llama.cpp's name of the pre-tokenizer (see ``PRE_TOKENIZERS``)."""
    special: dict[str, int]
    """``bos``, ``eos``, ``unk``, ``pad`` -> id, for those the tokenizer has."""
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def gguf_vocab(tok, vocab_size: int, bos_fallback: int | None = None) -> GGUFVocab:
    """The GGUF tokenizer metadata of ``tok`` (a fast tokenizer), padded to the model's ``vocab_size`` rows.

    ``bos_fallback`` (the model config's ``bos_token_id``) stands in when the tokenizer names no BOS token.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tok).__name__} is not a fast (tokenizer.json) tokenizer; {_only()}")
    spec = json.loads(backend.to_str())
    pre = _check_spec(spec)
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(
            f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows; "
            "export a student whose tokenizer fits its embedding"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows past the tokenizer (a vocabulary padded to a multiple): never produced
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(NORMAL if i not in added else CONTROL if added[i].get("special") else USER_DEFINED)
    special = {
        name: i
        for name, i in (
            ("bos", tok.bos_token_id if tok.bos_token_id is not None else bos_fallback),
            ("eos", tok.eos_token_id),
            ("unk", tok.unk_token_id),
            ("pad", tok.pad_token_id),
        )
        if i is not None
    }
    add_bos, add_eos = _adds_specials(tok)
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return GGUFVocab(tokens, types, _merges(spec), pre, special, add_bos, add_eos, template)


def _only() -> str:
    return f"GGUF export supports {SUPPORTED}"


def _check_spec(spec: dict) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json ``spec``, or an ExportError for what it cannot mirror."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type", "unknown") + (" with byte fallback" if model.get("byte_fallback") else "")
        raise ExportError(f"the tokenizer is a {kind} tokenizer; {_only()}")
    if spec.get("normalizer"):
        raise ExportError(f"the tokenizer normalizes text ({spec['normalizer'].get('type')}); {_only()}")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    found = [(s.get("type"), {k: s.get(k) for k in dict(_settings(s.get("type")))}) for s in steps]
    for name, known in PRE_TOKENIZERS.items():
        if found == known:
            return name
    shown = " + ".join(s.get("type", "?") for s in steps) or "none"
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({shown}) has no llama.cpp twin alignkd knows; {_only()}, whose "
        f"pre-tokenizer is one of: {', '.join(PRE_TOKENIZERS)}"
    )


def _settings(kind: str | None) -> dict:
    """The settings of a pre-tokenizer ``kind`` that ``PRE_TOKENIZERS`` compares."""
    for steps in PRE_TOKENIZERS.values():
        for step_kind, settings in steps:
            if step_kind == kind:
                return settings
    return {}


def _merges(spec: dict) -> list[str]:
    """The merges as ``"left right"`` strings (tokenizer.json holds pairs since tokenizers 0.20, strings before)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _adds_specials(tok) -> tuple[bool, bool]:
    """Whether encoding puts BOS before the text and EOS after it, as llama.cpp must too (``add_bos_token``)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    add_bos = tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] and plain[:1] != full[:1]
    add_eos = tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] and plain[-1:] != full[-1:]
    return add_bos, add_eos
