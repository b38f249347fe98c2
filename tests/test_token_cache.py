"""Tests of the token cache: cached blocks equal in-memory packing, reuse and invalidation, big files in flat memory.

The reference packing is written out here as plain Python (``reference_blocks``):
read every document, tokenise each, join with EOS, cut into blocks; what
alignkd did before the cache existed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from alignkd import testing as tiny
from alignkd.data import (
    Blocks,
    DataError,
    build_lm_data,
    files,
    read_texts,
    split_indices,
    tokenize_texts,
    tokens,
)

WORDS = [f"w{i}" for i in range(300)]


def word_tokenizer(*, bos: bool = False, extra: str = "") -> PreTrainedTokenizerFast:
    """Word-level: ``[PAD] [UNK] [EOS] [BOS]`` then w0..w299 (+ ``extra``), so ids are easy to read."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "[BOS]", *WORDS, *([extra] if extra else [])])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]"
    )


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: spaces become ``▁``, which starts each word (Llama 2, Mistral)."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", *(f"\u2581{w}" for w in WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def reference_blocks(source, tokenizer, seq_len, bos_id=None, max_tokens=None, text_field="text") -> torch.Tensor:
    """The in-memory packing of before the cache, in plain Python: ``[N, seq_len]`` int64."""
    stream: list[int] = []
    for doc in tokenize_texts(read_texts(source, text_field=text_field), tokenizer):
        if doc:
            stream += doc + [tokenizer.eos_token_id]
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    body = seq_len - (bos_id is not None)
    rows = [stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]
    if max_tokens is not None:
        rows = rows[: max_tokens // seq_len]
    return torch.tensor([([bos_id] if bos_id is not None else []) + r for r in rows], dtype=torch.int64)


def sources(tmp_path: Path) -> dict[str, str]:
    """One small source of each kind: JSONL, a folder of .txt/.md/.csv files, one text file."""
    rng = np.random.default_rng(0)

    def doc() -> str:
        return " ".join(rng.choice(WORDS, size=rng.integers(1, 30)))

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": doc(), "body": doc()}) + "\n" for _ in range(60)) + '{"text": " ", "body": "w1"}\n'
    )
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / f"{i}.txt").write_text(doc() + "\n\n" + doc())
    (folder / "sub" / "a.md").write_text(doc())
    (folder / "sub" / "t.csv").write_text("text,label\n" + "".join(f"{doc()},1\n" for _ in range(20)))
    text = tmp_path / "one.txt"
    text.write_text("\n".join(doc() for _ in range(40)))
    return {"jsonl": str(jsonl), "folder": str(folder), "text": str(text)}


def cached_and_not(source, tokenizer, cache, **kw):
    said: list[str] = []
    cached = build_lm_data(source, tokenizer, token_cache=str(cache), say=said.append, **kw)
    plain = build_lm_data(source, tokenizer, token_cache="off", **kw)
    return cached, plain, said


@pytest.mark.parametrize("kind", ["jsonl", "folder", "text"])
@pytest.mark.parametrize("bos", [False, True])
def test_cached_blocks_equal_the_in_memory_packing(tmp_path, kind, bos):
    src = sources(tmp_path)[kind]
    tok = word_tokenizer(bos=bos)
    bos_id = 3 if bos else None
    ref = reference_blocks(src, tok, 8, bos_id)
    for max_tokens in (None, 5 * 8, 5 * 8 + 3):
        ref_capped = ref if max_tokens is None else reference_blocks(src, tok, 8, bos_id, max_tokens)
        kw = {"seq_len": 8, "eval_fraction": 0, "bos_id": bos_id, "max_train_tokens": max_tokens}
        cached, plain, _ = cached_and_not(src, tok, tmp_path / "cache", **kw)
        assert isinstance(cached.train, Blocks) and isinstance(plain.train, torch.Tensor)
        assert cached.train[:].dtype == torch.int64 and torch.equal(cached.train[:], ref_capped)
        assert torch.equal(plain.train, ref_capped)
    # The seeded hold-out: the same rows in the same order, the train side a view (no copy).
    cached, plain, _ = cached_and_not(src, tok, tmp_path / "cache", seq_len=8, eval_fraction=0.2, seed=5, bos_id=bos_id)
    train_idx, eval_idx = split_indices(len(ref), 0.2, 5, "")
    for got, want in (
        (cached.train, ref[train_idx]),
        (cached.eval, ref[eval_idx]),
        (plain.train, ref[train_idx]),
        (plain.eval, ref[eval_idx]),
    ):
        assert torch.equal(got[:], want)
    assert cached.train.stream is cached.eval.stream and isinstance(cached.train.stream, np.memmap)


def test_separate_eval_source_and_text_field(tmp_path):
    s = sources(tmp_path)
    tok = word_tokenizer()
    cached, plain, _ = cached_and_not(s["jsonl"], tok, tmp_path / "cache", seq_len=8, eval=s["text"], text_field="body")
    assert torch.equal(cached.train[:], reference_blocks(s["jsonl"], tok, 8, text_field="body"))
    assert torch.equal(cached.eval[:], reference_blocks(s["text"], tok, 8))
    assert torch.equal(plain.train, cached.train[:]) and torch.equal(plain.eval, cached.eval[:])


def test_blocks_index_like_a_tensor(tmp_path):
    tok = word_tokenizer(bos=True)
    src = sources(tmp_path)["jsonl"]
    blocks = build_lm_data(src, tok, seq_len=6, eval_fraction=0, bos_id=3, token_cache=str(tmp_path / "c")).train
    ref = reference_blocks(src, tok, 6, 3)
    assert blocks.shape == ref.shape and len(blocks) == ref.shape[0] and blocks.shape[0] == len(ref)
    idx = torch.tensor([4, 0, 4, len(ref) - 1, -2])
    assert torch.equal(blocks[idx], ref[idx]) and blocks[idx].dtype == torch.int64
    assert torch.equal(blocks[3:9], ref[3:9]) and torch.equal(blocks[-3:], ref[-3:]) and blocks[5:2].shape == (0, 6)
    assert (
        torch.equal(blocks[7], ref[7])
        and torch.equal(blocks[:, 0], ref[:, 0])
        and torch.equal(blocks[idx, 1:], ref[idx, 1:])
    )
    view = blocks.select(torch.tensor([9, 2, 5, 7]))
    assert torch.equal(view[:], ref[[9, 2, 5, 7]]) and torch.equal(view[1:3], ref[[2, 5]])
    assert torch.equal(view.select(torch.tensor([3, 0]))[:], ref[[7, 9]])  # a view of a view reads the right blocks
    with pytest.raises(IndexError):
        view[torch.tensor([4])]


def test_second_run_reuses_the_cache_and_says_so(tmp_path):
    src = sources(tmp_path)["jsonl"]
    tok = word_tokenizer()
    first, said = [], []
    a = build_lm_data(src, tok, seq_len=8, token_cache=str(tmp_path / "cache"), say=first.append)
    assert len(first) == 1 and first[0].startswith(f"token cache: tokenised {src} into ")
    b = build_lm_data(src, tok, seq_len=16, token_cache=str(tmp_path / "cache"), say=said.append, bos_id=3)
    # One file serves any seq_len and BOS choice: the stream holds neither.
    assert said == [
        f"token cache: reusing {first[0].split(' into ')[1].split(' (')[0]} ({a.train.stream.size:,} tokens of {src})"
    ]
    assert torch.equal(b.train[:], build_lm_data(src, tok, seq_len=16, token_cache="off", bos_id=3).train)
    assert len(list((tmp_path / "cache").glob("*.tokens"))) == 1


def test_changed_files_tokenizer_or_field_make_a_new_cache(tmp_path):
    src = Path(sources(tmp_path)["jsonl"])
    cache = tmp_path / "cache"
    tok = word_tokenizer()

    def run(tokenizer=tok, **kw) -> str:
        said = []
        build_lm_data(str(src), tokenizer, seq_len=8, token_cache=str(cache), say=said.append, **kw)
        return said[0].split(":")[1].split()[0]  # "tokenised" or "reusing"

    assert run() == "tokenised" and run() == "reusing"
    other = word_tokenizer(extra="newword")  # one more vocabulary entry: other ids may follow
    assert run(other) == "tokenised" and run(other) == "reusing" and run() == "reusing"
    assert run(text_field="body") == "tokenised"
    assert len(list(cache.glob("*.tokens"))) == 3
    with src.open("a") as f:
        f.write(json.dumps({"text": "w1 w2 w3", "body": "w4"}) + "\n")
    assert run() == "tokenised"
    # The files changed: every cache made from them before is gone, the new one matches the new text.
    assert len(list(cache.glob("*.tokens"))) == 1 and len(list(cache.glob("*.json"))) == 1
    new = build_lm_data(str(src), tok, seq_len=8, token_cache=str(cache), eval_fraction=0).train
    assert torch.equal(new[:], reference_blocks(str(src), tok, 8))
    stamp = src.stat()
    os.utime(src, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # same bytes, touched: tokenised again
    assert run() == "tokenised"


def test_a_token_cap_caches_a_prefix_that_larger_caps_extend(tmp_path):
    src = sources(tmp_path)["jsonl"]
    tok = word_tokenizer()
    cache = tmp_path / "cache"
    # Stop after the first batch of documents, as a huge corpus with a small cap would.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokens, "BATCH_DOCS", 4)
        said = []
        capped = build_lm_data(
            src, tok, seq_len=8, max_train_tokens=24, eval_fraction=0, token_cache=str(cache), say=said.append
        )
        assert "the first" in said[0] and capped.train.stream.size < len(reference_blocks(src, tok, 8)) * 8
        assert torch.equal(capped.train[:], reference_blocks(src, tok, 8, max_tokens=24))
        said = []
        build_lm_data(
            src, tok, seq_len=8, max_train_tokens=16, eval_fraction=0, token_cache=str(cache), say=said.append
        )
        assert said[0].startswith("token cache: reusing")
        said = []
        whole = build_lm_data(src, tok, seq_len=8, eval_fraction=0, token_cache=str(cache), say=said.append)
        assert said[0].startswith("token cache: tokenised") and torch.equal(
            whole.train[:], reference_blocks(src, tok, 8)
        )


def test_auto_caches_big_sources_beside_them_or_in_the_user_cache(tmp_path, monkeypatch):
    src = sources(tmp_path)["jsonl"]
    tok = word_tokenizer()
    small = build_lm_data(src, tok, seq_len=8, token_cache="auto")
    assert isinstance(small.train, torch.Tensor) and not (tmp_path / tokens.CACHE_FOLDER).exists()
    monkeypatch.setattr(tokens, "AUTO_MIN_BYTES", 1)
    said = []
    beside = build_lm_data(src, tok, seq_len=8, token_cache="auto", say=said.append)
    assert isinstance(beside.train, Blocks) and len(list((tmp_path / tokens.CACHE_FOLDER).glob("*.tokens"))) == 1
    assert torch.equal(beside.train[:], small.train)
    # A data folder that cannot be written (root writes anywhere, so the check is replaced here).
    monkeypatch.setenv("ALIGNKD_CACHE", str(tmp_path / "user"))
    real = tokens._writable
    monkeypatch.setattr(tokens, "_writable", lambda f: f.parent != tmp_path and real(f))
    said = []
    fallback = build_lm_data(src, tok, seq_len=8, token_cache="auto", say=said.append)
    assert said[0] == f"token cache: {tmp_path} is not writable; caching tokens in {tmp_path / 'user' / 'tokens'}"
    assert said[1].startswith("token cache: tokenised") and torch.equal(fallback.train[:], small.train)
    with pytest.raises(
        DataError, match="data.token_cache: cannot write to .*; choose a writable folder, or auto or off"
    ):
        build_lm_data(src, tok, seq_len=8, token_cache=str(tmp_path / "x"))


def test_big_text_file_is_read_in_pieces_with_the_same_ids(tmp_path, monkeypatch):
    """A text file over WHOLE_TEXT_BYTES is tokenised in pieces cut before a space between words.

    The ids match the whole file's.
    """
    rng = np.random.default_rng(1)
    lines = [
        " ".join(rng.choice(WORDS + ["", "\t"], size=rng.integers(0, 12))) for _ in range(400)
    ]  # some runs of spaces
    text = "\n".join(lines) + "\n\n  \n"
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(files, "WHOLE_TEXT_BYTES", 100)
    monkeypatch.setattr(files, "TEXT_PIECE_CHARS", 64)
    pieces = list(files.text_pieces(path))
    assert len(pieces) > 20 and "".join(pieces) == text and read_texts(str(path)) == [text]
    for tok in (
        word_tokenizer(),
        tiny.byte_tokenizer(),
        metaspace_tokenizer(),
    ):  # GPT-2/SmolLM2-style, SentencePiece-style
        whole = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        got = build_lm_data(str(path), tok, seq_len=4, eval_fraction=0, token_cache=str(tmp_path / "c")).train
        assert np.asarray(got.stream).tolist() == whole  # EOS once, at the end of the file
        assert torch.equal(got[:], build_lm_data(str(path), tok, seq_len=4, eval_fraction=0, token_cache="off").train)


def test_cut_points_keep_whitespace_runs_whole():
    assert files.safe_cut("ab cd") == 2 and files.safe_cut("ab cd ef") == 5
    assert files.safe_cut("ab  cd") == 0 and files.safe_cut("ab\n cd") == 0 and files.safe_cut("ab \ncd") == 0
    assert files.safe_cut("a b\n\nc") == 1 and files.safe_cut("ab ") == 0 and files.safe_cut(" ab") == 0
    assert files.safe_cut("aa bb cc", start=6) == 0 and files.safe_cut("aa bb cc", start=5) == 5


def test_vocabulary_beyond_int32_is_refused():
    class Huge:
        def __len__(self):
            return 2**31

    with pytest.raises(DataError, match="more than int32 token files hold; set data.token_cache to off"):
        tokens.tokenize_stream(iter([("w1", True)]), Huge(), 2, lambda a: None)


def test_a_run_on_cached_blocks_logs_what_the_in_memory_run_logs(tmp_path):
    """A tiny causal-LM distillation: the same losses with data.token_cache off and with a cache folder."""
    import alignkd

    teacher = tiny.save_model(tmp_path / "teacher", "llama", layers=2, width=32)
    corpus = tiny.write_corpus(tmp_path / "corpus")
    logs = []
    for name, setting in (("off", "off"), ("cached", str(tmp_path / "tokens"))):
        cfg = {
            "teacher": {"path": str(teacher), "dtype": "float32"},
            "student": {"from_teacher": {"layers": [1]}},
            "data": {"train": str(corpus), "seq_len": 16, "eval_fraction": 0.1, "token_cache": setting},
            "losses": [{"type": "kl"}, {"type": "ce"}],
            "train": {
                "steps": 2,
                "batch_size": 4,
                "warmup": 0,
                "mixed_precision": "no",
                "progress": False,
                "eval_every": 0,
                "eval_batches": 1,
                "output_dir": str(tmp_path / name),
            },
        }
        alignkd.distill(cfg)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logs.append([{k: v for k, v in r.items() if k.startswith(("loss", "eval_loss"))} for r in rows])
    assert list((tmp_path / "tokens").glob("*.tokens")) and all(logs[0]) and logs[0] == logs[1]


# ----------------------------------------------------------------------------- memory

# Run in a fresh process that imports once, then forks one child per file: each child's peak
# RSS (ru_maxrss from wait4) starts from the same imported baseline, so the peaks compare.
CHILD = textwrap.dedent(
    r"""
    import json, os, sys, traceback
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from alignkd.data import build_lm_data

    def measure(path, cache):
        pid = os.fork()
        if pid == 0:
            try:
                words = json.loads(sys.argv[1])
                vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
                t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
                t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
                tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<eos>")
                lm = build_lm_data(path, tok, seq_len=64, token_cache=cache)
                g = torch.Generator().manual_seed(0)
                for _ in range(20):  # a few training batches, read as the loop reads them
                    assert lm.train[torch.randint(len(lm.train), (16,), generator=g)].dtype == torch.int64
                print(json.dumps({"path": path, "blocks": len(lm.train) + len(lm.eval)}), flush=True)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        _, status, usage = os.wait4(pid, 0)
        return status, usage.ru_maxrss * 1024  # KiB on Linux

    out = [measure(p, c) for p, c in json.loads(sys.argv[2])]
    print(json.dumps(out))
    """
)
WORD_CHARS = 60  # long words: few ids per byte, so 150 MB tokenise in seconds


def _write_corpus(path: Path, mib: int, words: list[str]) -> None:
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(20, 400)))}) + "\n" for _ in range(100)]
    chunk = "".join(lines).encode()
    with path.open("wb") as f:
        for _ in range(-(-(mib << 20) // len(chunk))):
            f.write(chunk)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and fork as on Linux")
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    words = [f"{i:04d}".ljust(WORD_CHARS, "x") for i in range(500)]
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    _write_corpus(small, 24, words)
    _write_corpus(big, 120, words)
    t0 = time.perf_counter()
    runs = [
        (str(small), str(tmp_path / "cache")),
        (str(big), str(tmp_path / "cache")),
        (str(big), str(tmp_path / "cache")),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(words), json.dumps(runs)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (s_status, s_rss), (b_status, b_rss), (r_status, r_rss) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s_status == b_status == r_status == 0, proc.stdout + proc.stderr[-3000:]
    grown = b_rss - s_rss
    extra = big.stat().st_size - small.stat().st_size
    print(
        f"peak RSS: {s_rss / 2**20:.0f} MiB for {small.stat().st_size / 2**20:.0f} MiB of JSONL, "
        f"{b_rss / 2**20:.0f} MiB for {big.stat().st_size / 2**20:.0f} MiB, {r_rss / 2**20:.0f} MiB reusing its cache; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    # Holding the texts would add `extra` bytes; the ids as int64 blocks, plus the split's copy,
    # 2 * 8 bytes per 61: extra / 4. Allocator noise between runs is a few MiB.
    assert grown < extra / 8, f"peak RSS grew {grown / 2**20:.0f} MiB for {extra / 2**20:.0f} MiB more text"
    assert r_rss - s_rss < extra / 8
