"""A byte-level BPE tokenizer trained on the training text: a new student's own tokenizer (``student.new_tokenizer``).

A student built for a domain or a language can read it in fewer, better-fitting
tokens than the teacher's general vocabulary. The tokenizer is trained once,
with the ``tokenizers`` library, on the training text, and kept beside it
(``.alignkd-tokenizers/``, keyed by the text and the vocabulary size), so
every later run and study variant reads the same one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from alignkd.data.sources import read_texts
from alignkd.data.tokens import cache_folder
from alignkd.errors import DataError

FOLDER = ".alignkd-tokenizers"
SPECIALS = ["<|endoftext|>", "<pad>"]
"""End of text (also the BOS-less block separator) and padding: ids 0 and 1."""


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens (the 256 bytes and ``SPECIALS``
    included) trained on ``texts``; any text round-trips through it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1])


def _fingerprint(source: str, vocab_size: int, text_field: str) -> str:
    """What the tokenizer is made from: the source (a local one's files, by name, size and time), size and field."""
    local = Path(source).exists()
    h = hashlib.sha256(f"{Path(source).resolve() if local else source}|{vocab_size}|{text_field}".encode())
    for path in sorted(Path(source).rglob("*")) if Path(source).is_dir() else [Path(source)]:
        if local and path.is_file():
            st = path.stat()
            name = path.relative_to(source) if path != Path(source) else path.name
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def student_bpe(source: str, vocab_size: int, *, text_field: str = "text", say: Callable[[str], None] = print) -> Path:
    """The folder of the BPE tokenizer of ``vocab_size`` tokens trained on ``source``: made on first use, then
    reused."""
    local = Path(source).exists()
    folder = cache_folder(source, "auto", say, folder=FOLDER, fallback="tokenizers", beside=local)
    out = folder / f"bpe{vocab_size}-{_fingerprint(source, vocab_size, text_field)}"
    if (out / "tokenizer.json").is_file():
        say(f"student tokenizer: {out} (reused)")
        return out
    texts = read_texts(source, text_field=text_field)
    if not texts:
        raise DataError(f"data.train: {source} holds no text to train the student's tokenizer on")
    tok = train_bpe(texts, vocab_size)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process of the launch saved the same tokenizer first
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"student tokenizer: a byte-level BPE of {len(tok)} tokens trained on {source}, kept in {out}")
    return out
