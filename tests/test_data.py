"""Tests of alignkd.data: every source kind, every error message, packing, splits, the sampler.

The tokenizer is a word-level vocabulary built here (no network): words are
``w0 .. w199`` plus a few English words, so token ids are easy to predict.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from alignkd import testing as tiny
from alignkd.data import (
    BlockSampler,
    DataError,
    build_classification_data,
    build_lm_data,
    iter_pieces,
    pack,
    read_labelled,
    read_texts,
    resolve_bos,
    tokenize_texts,
    wants_bos,
)

SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"]
WORDS = ["hello", "world", "good", "bad", "movie", "film"] + [f"w{i}" for i in range(200)]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
PAD, UNK, EOS, CLS, SEP = range(5)


def make_tokenizer(*, eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; special tokens wrap a text as ``[CLS] ... [SEP]`` (BERT-like)."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    extra = {"eos_token": "[EOS]"} if eos else {"sep_token": "[SEP]", "cls_token": "[CLS]"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **extra)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids(*words: str) -> list[int]:
    return [VOCAB[w] for w in words]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_csv(path, header, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ----------------------------------------------------------------------------- sources


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("hello world\n\ngood movie\n", encoding="utf-8")
    assert read_texts(str(p)) == ["hello world\n\ngood movie\n"]
    other = tmp_path / "notes.log"  # any non-json/csv suffix is plain text
    other.write_text("w1 w2", encoding="utf-8")
    assert read_texts(str(other)) == ["w1 w2"]


def test_folder_reads_text_files_recursively_sorted_and_structured_files_by_rule(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.txt").write_text("   \n", encoding="utf-8")  # whitespace only: skipped
    write_jsonl(tmp_path / "d.jsonl", [{"text": "third"}, {"text": "fourth"}])
    write_csv(tmp_path / "e.csv", ["text"], [["fifth"]])
    (tmp_path / "ignored.bin").write_bytes(b"\xff\xfe")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    assert read_texts(str(tmp_path)) == ["first", "second", "third", "fourth", "fifth"]


def test_jsonl_reads_the_named_field_and_skips_empty_records(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello"}, {"body": ""}, {"body": None}, {"body": "world"}])
    with open(p, "a", encoding="utf-8") as f:
        f.write("\n")  # blank lines are fine
    assert read_texts(p, text_field="body") == ["hello", "world"]


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert read_texts(str(p)) == ["a", "b"]


def test_csv_and_tsv_read_the_named_column(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["id", "content"], [[1, "hello, world"], [2, "good"], [3, " "]])
    assert read_texts(p, text_field="content") == ["hello, world", "good"]
    t = write_csv(tmp_path / "d.tsv", ["content"], [["a\tb"], ["c"]], delimiter="\t")
    assert read_texts(t, text_field="content") == ["a\tb", "c"]


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hello", "", "world"], "label": ["pos", "pos", "neg"]})
    ds.save_to_disk(str(tmp_path / "flat"))
    assert read_texts(str(tmp_path / "flat")) == ["hello", "world"]
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert read_texts(str(tmp_path / "dict"), split="validation") == ["hello"]
    assert read_labelled(str(tmp_path / "flat")) == (["hello", "world"], [1, 0], ["neg", "pos"])
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\)"):
        read_texts(str(tmp_path / "dict"), split="test")
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, label\); set data.text_field"):
        read_texts(str(tmp_path / "flat"), text_field="body")


# ----------------------------------------------------------------------------- errors


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "sub/dir/missing", "./missing"])
def test_missing_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_texts(name)
    assert one_line(e) == f"data file not found: {name}"
    with pytest.raises(DataError, match="data file not found"):
        read_labelled(str(tmp_path / name))


def test_hub_name_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import now fails
    with pytest.raises(DataError) as e:
        read_texts("someone/some_corpus")
    assert "pip install datasets" in one_line(e)


def test_record_without_the_field_names_the_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    with pytest.raises(DataError) as e:
        read_texts(p)
    assert one_line(e) == f"{p} line 3 has no 'text' field; set data.text_field"


def test_bad_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{text: b}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 is not valid JSON") as e:
        read_texts(str(p))
    one_line(e)


def test_csv_without_the_column_lists_the_columns(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["id", "content"], [[1, "a"]])
    with pytest.raises(DataError) as e:
        read_texts(p)
    assert one_line(e) == f"{p} has no column 'text' (columns: id, content); set data.text_field"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "folder"])
def test_empty_source(tmp_path, kind):
    if kind == "txt":
        p = tmp_path / "d.txt"
        p.write_text(" \n\t", encoding="utf-8")
    elif kind == "jsonl":
        p = tmp_path / "d.jsonl"
        write_jsonl(p, [{"text": " "}, {"text": ""}])
    elif kind == "csv":
        p = tmp_path / "d.csv"
        write_csv(p, ["text"], [])
    else:
        p = tmp_path / "empty"
        p.mkdir()
    with pytest.raises(DataError) as e:
        read_texts(str(p))
    assert one_line(e).startswith(f"no text found in {p}")


def test_sources_are_read_as_consumed(tmp_path):
    """A JSONL file is read line by line: its first document comes out before a broken line further on is reached."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{text: c}\n', encoding="utf-8")
    pieces = iter_pieces(str(p))
    assert next(pieces) == ("a", True) and next(pieces) == ("b", True)
    with pytest.raises(DataError, match=r"line 3 is not valid JSON"):
        next(pieces)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\x00"])
def test_streamed_files_keep_their_encoding_errors(tmp_path, monkeypatch, suffix, bad):
    from alignkd.data import files

    monkeypatch.setattr(files, "WHOLE_TEXT_BYTES", 16)  # the .txt file is read in pieces too
    monkeypatch.setattr(files, "TEXT_PIECE_CHARS", 8)
    p = tmp_path / f"d{suffix}"
    p.write_bytes(b'{"text": "a b c"}\n' * 4 + b'{"text": "' + bad + b'"}\n')
    with pytest.raises(DataError) as e:
        read_texts(str(p))
    assert one_line(e) == (
        f"{p} is not UTF-8 text; convert it or give a .txt/.md/.jsonl/.csv file"
        if bad == b"\xff\xfe"
        else f"{p} holds NUL bytes, so it is binary, not text; give a .txt/.md/.jsonl/.csv file"
    )


def test_a_big_text_file_is_one_document_in_pieces(tmp_path, monkeypatch):
    from alignkd.data import files

    monkeypatch.setattr(files, "WHOLE_TEXT_BYTES", 16)
    monkeypatch.setattr(files, "TEXT_PIECE_CHARS", 8)
    p = tmp_path / "d.txt"
    text = "w1 w2\nw3\n\nw4 w5 w6\nw7\n \n"
    p.write_text(text, encoding="utf-8")
    pieces = list(iter_pieces(str(p)))
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True] and len(pieces) > 2
    assert "".join(t for t, _ in pieces) == text and read_texts(str(p)) == [text]
    p.write_text(" \n\t" * 20, encoding="utf-8")  # blank, however it is cut
    with pytest.raises(DataError, match="no text found"):
        read_texts(str(p))


# ----------------------------------------------------------------------------- tokens and packing


def test_tokenize_without_special_tokens_in_batches(tokenizer):
    texts = ["hello world", "good movie w7", "w1"]
    assert tokenize_texts(texts, tokenizer, batch=2) == [ids("hello", "world"), ids("good", "movie", "w7"), ids("w1")]


def test_pack_puts_eos_after_each_document_and_drops_the_tail():
    blocks = pack([[10, 11, 12], [20, 21], [], [30, 31, 32, 33]], seq_len=4, eos_id=2)
    # stream: 10 11 12 2 | 20 21 2 30 | 31 32 33 2  -> 12 tokens, 3 blocks, no tail
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[10, 11, 12, 2], [20, 21, 2, 30], [31, 32, 33, 2]]
    blocks = pack([[10, 11, 12], [20, 21]], seq_len=2, eos_id=None)
    assert blocks.tolist() == [[10, 11], [12, 20]]  # no EOS; tail [21] dropped


def test_pack_too_short_says_lower_seq_len():
    with pytest.raises(DataError) as e:
        pack([[1, 2], [3]], seq_len=8, eos_id=0)
    assert one_line(e) == "the text holds 5 tokens but data.seq_len is 8; lower data.seq_len or add text"


def corpus(tmp_path, n_docs=20, words_per_doc=7):
    """Documents of distinct words, so every packed block is distinct."""
    words = iter(range(200))
    docs = [" ".join(f"w{next(words)}" for _ in range(words_per_doc)) for _ in range(n_docs)]
    return write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])


def rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


def test_lm_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    src = corpus(tmp_path)  # 20 docs * (7 + EOS) = 160 tokens -> 20 blocks of 8
    a = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.2, seed=3)
    b = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.2, seed=3)
    c = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.2, seed=4)
    assert a.train.shape == (16, 8) and a.eval.shape == (4, 8)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert not rows(a.eval) & rows(a.train)
    assert len(rows(a.train) | rows(a.eval)) == 20
    assert rows(c.eval) != rows(a.eval)
    assert (a.train[:, -1] == EOS).all()  # each 8-token block is one document + EOS


def test_lm_eval_fraction_extremes(tmp_path, tokenizer):
    src = corpus(tmp_path, n_docs=2)  # 2 blocks
    tiny = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.01)
    assert tiny.train.shape == (1, 8) and tiny.eval.shape == (1, 8)  # at least one eval block
    none = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.0)
    assert none.train.shape == (2, 8) and none.eval.shape == (0, 8)
    with pytest.raises(DataError, match="packs into 1 block .*set data.eval_fraction to 0"):
        build_lm_data(src, tokenizer, seq_len=16, eval_fraction=0.1)
    with pytest.raises(DataError, match=r"c.jsonl: the text holds 16 tokens but data.seq_len is 32"):
        build_lm_data(src, tokenizer, seq_len=32)


def test_lm_separate_eval_source_and_token_cap(tmp_path, tokenizer):
    src = corpus(tmp_path)
    ev = tmp_path / "eval.txt"
    ev.write_text("hello world good movie bad film hello world w0", encoding="utf-8")
    data = build_lm_data(src, tokenizer, seq_len=8, eval=str(ev), max_train_tokens=40)
    assert data.train.shape == (5, 8)  # 40 tokens of the stream
    assert data.train.tolist()[0] == ids(*[f"w{i}" for i in range(7)]) + [EOS]
    assert data.eval.tolist() == [ids("hello", "world", "good", "movie", "bad", "film", "hello", "world")]


def test_bert_like_tokenizer_separates_documents_with_sep(tmp_path):
    tok = make_tokenizer(eos=False)
    assert tok.eos_token_id is None
    data = build_lm_data(corpus(tmp_path, n_docs=4), tok, seq_len=8, eval_fraction=0)
    assert (data.train[:, -1] == SEP).all()


# ----------------------------------------------------------------------------- labelled data


def test_read_labelled_string_labels_sorted(tmp_path):
    p = write_jsonl(
        tmp_path / "l.jsonl",
        [
            {"text": "good movie", "label": "pos"},
            {"text": "bad film", "label": "neg"},
            {"text": " ", "label": "x"},
            {"text": "good film", "label": "pos"},
        ],
    )
    assert read_labelled(p) == (["good movie", "bad film", "good film"], [1, 0, 1], ["neg", "pos"])


def test_read_labelled_integer_labels_from_csv(tmp_path):
    p = write_csv(tmp_path / "l.csv", ["sentence", "y"], [["good", 2], ["bad", 0]])
    assert read_labelled(p, text_field="sentence", label_field="y") == (["good", "bad"], [2, 0], ["0", "1", "2"])


def test_read_labelled_errors(tmp_path):
    p = write_jsonl(tmp_path / "l.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad"}])
    with pytest.raises(DataError) as e:
        read_labelled(p)
    assert one_line(e) == f"{p} line 2 has no 'label' field; set data.label_field"
    c = write_csv(tmp_path / "l.csv", ["text", "class"], [["good", "pos"]])
    with pytest.raises(DataError) as e:
        read_labelled(c)
    assert one_line(e) == f"{c} has no column 'label' (columns: text, class); set data.label_field"
    t = tmp_path / "plain.txt"
    t.write_text("good", encoding="utf-8")
    with pytest.raises(DataError, match="not labelled data"):
        read_labelled(str(t))
    m = write_jsonl(tmp_path / "m.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 0}])
    with pytest.raises(DataError, match="mixes integer and text labels"):
        read_labelled(m)
    u = write_jsonl(tmp_path / "u.jsonl", [{"text": "good", "label": -1}])
    with pytest.raises(DataError, match="line 1 has label -1"):
        read_labelled(u)


def test_classification_data_pads_masks_and_splits(tmp_path, tokenizer):
    # Texts of 3, 6 or 9 words: some fit seq_len=6 with CLS/SEP, some are truncated.
    recs = [
        {"text": " ".join([f"w{i} w{i + 1} w{i + 2}"] * (1 + i % 3)), "label": "pos" if i % 2 else "neg"}
        for i in range(10)
    ]
    p = write_jsonl(tmp_path / "l.jsonl", recs)
    a = build_classification_data(p, tokenizer, seq_len=6, eval_fraction=0.2, seed=1)
    b = build_classification_data(p, tokenizer, seq_len=6, eval_fraction=0.2, seed=1)
    assert a.label_names == ["neg", "pos"]
    assert a.train_ids.shape == (8, 6) and a.eval_ids.shape == (2, 6) and a.eval_labels.shape == (2,)
    assert a.train_mask.dtype == torch.bool and a.train_labels.dtype == torch.int64
    assert torch.equal(a.eval_ids, b.eval_ids) and torch.equal(a.train_labels, b.train_labels)
    ids_all = torch.cat([a.train_ids, a.eval_ids])
    assert (ids_all[:, 0] == CLS).all()
    assert ((ids_all == SEP).sum(1) == 1).all()  # truncation keeps the final SEP
    assert torch.equal(ids_all == PAD, ~torch.cat([a.train_mask, a.eval_mask]))
    # Labels follow their texts through the shuffle: text "wi ..." has label pos iff i is odd.
    for x, y in zip(ids_all.tolist(), torch.cat([a.train_labels, a.eval_labels]).tolist(), strict=True):
        i = x[1] - VOCAB["w0"]
        assert a.label_names[y] == ("pos" if i % 2 else "neg")
    assert sorted(ids_all[:, 1].tolist()) == ids(*[f"w{i}" for i in range(10)])


def test_classification_eval_source_shares_label_ids(tmp_path, tokenizer):
    tr = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"text": "film", "label": "meh"}, {"text": "good", "label": "pos"}])
    d = build_classification_data(tr, tokenizer, seq_len=4, eval=ev)
    assert d.label_names == ["meh", "neg", "pos"]
    assert d.train_labels.tolist() == [2, 1] and d.eval_labels.tolist() == [0, 2]
    assert d.eval_ids.tolist() == [[CLS, VOCAB["film"], SEP, PAD], [CLS, VOCAB["good"], SEP, PAD]]


# ----------------------------------------------------------------------------- sampler


def take(sampler: BlockSampler, n: int) -> list[list[int]]:
    return [sampler.next_indices().tolist() for _ in range(n)]


def test_sampler_is_deterministic_and_walks_permutations():
    s = BlockSampler(10, 3, seed=5)
    batches = take(s, 6)
    assert batches == take(BlockSampler(10, 3, seed=5), 6)
    assert batches != take(BlockSampler(10, 3, seed=6), 6)
    epoch0 = sum(batches[:3], [])
    assert len(set(epoch0)) == 9  # 3 batches of 3 from one permutation; the 10th example is dropped
    assert epoch0 == torch.randperm(10, generator=torch.Generator().manual_seed(5))[:9].tolist()
    assert s.state_dict() == {"epoch": 1, "position": 3}


def test_sampler_state_round_trip_mid_epoch():
    s = BlockSampler(50, 4, seed=0)
    take(s, 17)  # epoch 1, partway through
    state = s.state_dict()
    expected = take(s, 20)
    restored = BlockSampler(50, 4, seed=0)
    restored.load_state_dict(state)
    assert take(restored, 20) == expected
    with pytest.raises(ValueError, match="resume with the same data"):
        restored.load_state_dict({"epoch": 0, "position": 99})


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    ranks = [BlockSampler(40, 4, seed=2, rank=r, world_size=3) for r in range(3)]
    single = BlockSampler(40, 12, seed=2)
    for _ in range(7):  # crosses an epoch boundary (3 global batches per epoch)
        parts = [r.next_indices().tolist() for r in ranks]
        assert len(set(sum(parts, []))) == 12
        assert sum(parts, []) == single.next_indices().tolist()


def test_sampler_with_fewer_examples_than_a_batch_wraps():
    s = BlockSampler(3, 4, seed=0, rank=1, world_size=2)
    batch = s.next_indices()
    assert batch.shape == (4,) and set(batch.tolist()) <= {0, 1, 2}
    assert s.next_indices().shape == (4,)
    with pytest.raises(DataError, match="0 examples"):
        BlockSampler(0, 4)


# ----------------------------------------------------------------------------- BOS

BOS = len(VOCAB)  # after every other id, so the BOS tokenizer's other ids match make_tokenizer()'s


def bos_tokenizer(*, adds: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with a ``[BOS]`` token; ``adds``: put it before every text (Llama/Gemma-like)."""
    tok = Tokenizer(models.WordLevel(vocab={**VOCAB, "[BOS]": BOS}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]"
    )


def test_wants_bos_is_what_the_tokenizer_does(tokenizer):
    assert wants_bos(bos_tokenizer())
    assert not wants_bos(bos_tokenizer(adds=False))  # GPT-2/SmolLM2-like: a BOS token it never adds
    assert not wants_bos(tokenizer)  # BERT-like: [CLS] first, no BOS at all
    assert wants_bos(tiny.byte_tokenizer(bos=True)) and not wants_bos(tiny.byte_tokenizer())


def test_resolve_bos_auto_always_never(tokenizer):
    assert resolve_bos("auto", bos_tokenizer()) == BOS
    assert resolve_bos("auto", bos_tokenizer(adds=False)) is None
    assert resolve_bos("auto", tokenizer) is None
    assert resolve_bos("never", bos_tokenizer()) is None
    assert resolve_bos("always", bos_tokenizer(adds=False)) == BOS
    with pytest.raises(DataError) as e:
        resolve_bos("always", tokenizer)
    assert one_line(e) == "data.bos is always but the tokenizer has no BOS token; set data.bos to never or auto"


def test_pack_with_bos_leads_every_block_with_it():
    docs = [[10, 11, 12], [20, 21], [], [30, 31, 32, 33]]
    blocks = pack(docs, seq_len=4, eos_id=2, bos_id=9)
    # stream: 10 11 12 2 20 21 2 30 31 32 33 2 -> 3 stream tokens after each BOS, mid-document or not
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[9, 10, 11, 12], [9, 2, 20, 21], [9, 2, 30, 31], [9, 32, 33, 2]]
    assert torch.equal(pack(docs, seq_len=4, eos_id=2, bos_id=None), pack(docs, seq_len=4, eos_id=2))
    with pytest.raises(DataError) as e:
        pack(docs, seq_len=1, eos_id=2, bos_id=9)
    assert one_line(e) == "data.seq_len is 1; set it to at least 2 tokens"


def test_lm_blocks_start_with_bos_and_bos_is_never_a_ce_target(tmp_path, tokenizer):
    src = corpus(tmp_path)  # 160 stream tokens
    plain = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0)
    data = build_lm_data(src, bos_tokenizer(), seq_len=8, eval_fraction=0, bos_id=resolve_bos("auto", bos_tokenizer()))
    assert data.train.shape == (160 // 7, 8)
    # Causal-LM CE: position i predicts token i + 1, so its targets are input_ids[:, 1:]: BOS is never one.
    assert (data.train[:, 0] == BOS).all() and (data.train[:, 1:] != BOS).all()
    # Under the BOS column, the same token stream as without BOS, cut into 7s.
    assert torch.equal(data.train[:, 1:].flatten(), plain.train.flatten()[: data.train[:, 1:].numel()])
    # The token cap counts BOS: at most max_train_tokens // seq_len blocks.
    capped = build_lm_data(src, bos_tokenizer(), seq_len=8, eval_fraction=0, max_train_tokens=40, bos_id=BOS)
    assert capped.train.shape == (5, 8)


def test_lm_blocks_without_bos_are_unchanged(tmp_path, tokenizer):
    src = corpus(tmp_path)
    before = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.2, seed=3)
    after = build_lm_data(src, tokenizer, seq_len=8, eval_fraction=0.2, seed=3, bos_id=resolve_bos("auto", tokenizer))
    assert torch.equal(before.train, after.train) and torch.equal(before.eval, after.eval)
    never = build_lm_data(
        src, bos_tokenizer(), seq_len=8, eval_fraction=0, bos_id=resolve_bos("never", bos_tokenizer())
    )
    assert not (never.train == BOS).any()


def test_classification_rows_start_with_bos_for_a_tokenizer_that_adds_it(tmp_path):
    p = write_jsonl(tmp_path / "l.jsonl", [{"text": f"w{i} good", "label": i % 2} for i in range(6)])
    d = build_classification_data(p, bos_tokenizer(), seq_len=4, eval_fraction=0.5)
    rows_ = torch.cat([d.train_ids, d.eval_ids])
    assert (rows_[:, 0] == BOS).all()
    assert sorted(rows_[:, 1:3].tolist()) == sorted(ids(f"w{i}", "good") for i in range(6))
    assert ((rows_ == BOS).sum(1) == 1).all()


def test_data_bos_setting_is_validated():
    from alignkd.config import ConfigError, load_config

    base = {
        "teacher": {"path": "t"},
        "student": {"from_teacher": {"num_layers": 1}},
        "data": {"train": "x.txt"},
        "losses": [{"type": "kl"}],
    }
    assert load_config(data=base).data.bos == "auto"
    with pytest.raises(ConfigError, match="^data.bos: 'sometimes' is not one of auto, always, never"):
        load_config(data={**base, "data": {"train": "x.txt", "bos": "sometimes"}})


def test_a_run_records_the_bos_choice_in_its_config(tmp_path):
    import yaml

    import alignkd

    teacher = tiny.save_model(tmp_path / "teacher", "llama", layers=1, width=16, heads=2, bos=True)
    corpus_dir = tiny.write_corpus(tmp_path / "corpus", docs=4)
    cfg = {
        "teacher": {"path": str(teacher)},
        "student": {"from_teacher": {"layers": [0]}},
        "data": {"train": str(corpus_dir), "seq_len": 16, "eval_fraction": 0.1},
        "losses": [{"type": "kl"}, {"type": "ce"}],
        "train": {
            "steps": 1,
            "batch_size": 2,
            "warmup": 0,
            "mixed_precision": "no",
            "progress": False,
            "eval_batches": 1,
            "output_dir": str(tmp_path / "run"),
        },
    }
    alignkd.distill(cfg)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["bos"] == "always"
    cfg["data"]["bos"], cfg["train"]["output_dir"] = "never", str(tmp_path / "never")
    alignkd.distill(cfg)
    assert yaml.safe_load((tmp_path / "never" / "config.yaml").read_text())["data"]["bos"] == "never"
