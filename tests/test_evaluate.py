"""``alignkd.evaluate``: every metric against a value worked out by hand in the test.

Perplexity is checked against a plain loop over the windows with log_softmax;
accuracy against a unigram stub whose label-word log-likelihoods are known, a
tiny llama scored by one full forward, and a classifier head forced to one
class; BLEU/ROUGE/CER against hand-computed values; parameter counts against
the llama formula. Then ``evaluate_models`` and ``alignkd eval`` run end to end
on tiny saved models and the written ``eval.json`` is checked key by key.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from transformers.modeling_outputs import CausalLMOutputWithPast

from alignkd import cli
from alignkd import testing as tiny
from alignkd.evaluate import (
    EvalError,
    EvalSettings,
    continuations,
    demo_prefix,
    evaluate_models,
    generation_metrics,
    label_accuracy,
    label_scores,
    latency,
    param_counts,
    passages,
    perplexity,
    print_table,
    read_labelled,
    retention,
    size_on_disk,
    split_shots,
    token_stream,
)
from alignkd.evaluate.catalogue import BY_KEY, KEPT, NEAR_CHANCE, chance_level, near_chance
from alignkd.evaluate.catalogue import METRICS as CATALOGUE
from alignkd.evaluate.inputs import token_lengths
from alignkd.evaluate.perplexity import score_text

TOK = tiny.byte_tokenizer()
TEXTS = [tiny.TEXT, tiny.TEXT[::-1], tiny.TEXT.upper()]


def write_csv(path: Path, rows: int = 24) -> Path:
    """A balanced two-class CSV; the label follows the text's first word."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            good = i % 3 != 0
            w.writerow([f"{'great' if good else 'awful'} film, take {i}", "positive" if good else "negative"])
    return path


def labelled(rows: int = 24) -> tuple[list[str], list[str]]:
    texts = [f"{'great' if i % 3 else 'awful'} film, take {i}" for i in range(rows)]
    return texts, ["positive" if i % 3 else "negative" for i in range(rows)]


# ----------------------------------------------------------------------------- perplexity


def windows_by_hand(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The transformers strided-perplexity recipe, written out: full logits, log_softmax, -100 masks."""
    n, nll, count, prev_end = ids.numel(), 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        chunk = ids[begin:end]
        targets = chunk.clone()
        targets[:-trg_len] = -100
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), -1)
        for pos in range(1, chunk.numel()):
            if targets[pos] != -100:
                nll -= logp[pos - 1, targets[pos]].item()
                count += 1
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("window,stride,scored", [(32, 12, 149), (24, 1, 149), (40, 40, 146)])
def test_perplexity_matches_a_loop_over_windows(window, stride, scored):
    model = tiny.build("llama")
    ids = token_stream(TOK, TEXTS, 150)
    got, n = perplexity(model, TOK, TEXTS, max_tokens=150, window=window, stride=stride)
    ref, ref_n = windows_by_hand(model, ids, window, stride)
    # Overlapping windows score every token but the first; disjoint ones (stride == window)
    # also miss each later window's first token, which nothing in its window predicts.
    assert n == ref_n == scored
    assert got == pytest.approx(ref, rel=1e-5)


def test_one_window_is_exp_mean_nll_of_one_forward():
    model = tiny.build("qwen2")
    ids = token_stream(TOK, TEXTS, 100)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    for window in (100, 200):
        got, n = perplexity(model, TOK, TEXTS, max_tokens=100, window=window, stride=7)
        assert n == 99
        assert got == pytest.approx(expected, rel=1e-5)


def test_stride_below_window_scores_each_token_once():
    model = tiny.build("gpt2")
    for window, stride, tokens in [(16, 5, 101), (16, 15, 64), (16, 3, 17), (50, 49, 300), (8, 1, 40)]:
        _, n = perplexity(model, TOK, TEXTS, max_tokens=tokens, window=window, stride=stride)
        assert n == tokens - 1


def test_token_stream_joins_documents_with_eos():
    ids = token_stream(TOK, ["ab", "c"]).tolist()
    assert ids == TOK("ab")["input_ids"] + [TOK.eos_token_id] + TOK("c")["input_ids"]
    assert token_stream(TOK, ["ab", "cd"], 2).tolist() == TOK("ab")["input_ids"]


def test_token_lengths_spell_the_text_once_whatever_the_tokenizer_splits():
    texts = ["naïve café 😀 ok", "  two  spaces", "x"]
    for tok in (TOK, _bpe_tokenizer()):
        ids, nbytes, nchars = token_lengths(tok, texts)
        assert torch.equal(ids, token_stream(tok, texts))
        eos = tok.eos_token_id is not None
        assert int(nbytes.sum()) == sum(len(t.encode()) for t in texts)
        assert int(nchars.sum()) == sum(len(t) for t in texts)
        if eos:
            assert (nbytes[ids == tok.eos_token_id] == 0).all()


def _bpe_tokenizer():
    """A byte-level BPE trained here (270 tokens), which splits a multi-byte character over tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator([tiny.TEXT, "naïve café 😀 ok", "two spaces"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_bits_per_byte_is_the_nll_of_the_scored_tokens_over_their_bytes():
    model = tiny.build("llama")
    ids, nbytes, nchars = token_lengths(TOK, TEXTS, 100)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    nll = F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()  # one window: every token but the first
    got = score_text(model, TOK, TEXTS, max_tokens=100, window=128, stride=7)
    assert got.nll == pytest.approx(nll, rel=1e-5) and got.bytes == int(nbytes[1:].sum())
    assert got.bits_per_byte == pytest.approx(nll / math.log(2) / int(nbytes[1:].sum()), rel=1e-5)
    assert got.bits_per_char == pytest.approx(nll / math.log(2) / int(nchars[1:].sum()), rel=1e-5)
    # Disjoint windows skip each window's first token: neither its NLL nor its bytes count.
    split = score_text(model, TOK, TEXTS, max_tokens=100, window=40, stride=40)
    assert split.tokens == 97 and split.bytes == int(nbytes.sum() - nbytes[[0, 40, 80]].sum())


BOS_TOK = tiny.byte_tokenizer(bos=True)  # adds <bos> to every text, as Llama's and Gemma's tokenizers do
BOS = BOS_TOK.bos_token_id


def bos_windows_by_hand(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Plain transformers with BOS first: windows of ``window - 1`` text tokens every ``min(stride, window - 1)``,
    BOS prepended to each, each text token scored once from the first window that reaches it, BOS never scored."""
    span, step = window - 1, min(stride, window - 1)
    n, nll, count, prev_end = ids.numel(), 0.0, 0, 0
    for begin in range(0, n, step):
        end = min(begin + span, n)
        chunk = torch.cat([torch.tensor([BOS]), ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), -1)
        for pos in range(1, chunk.numel()):  # position 0 is BOS: nothing predicts it
            if begin + pos - 1 >= prev_end:  # the text token at chunk position pos is new
                nll -= logp[pos - 1, chunk[pos]].item()
                count += 1
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("window,stride", [(32, 12), (24, 1), (40, 40), (33, 32)])
def test_perplexity_with_bos_matches_plain_transformers(window, stride):
    model = tiny.build("llama")
    ids = token_stream(BOS_TOK, TEXTS, 150)
    assert BOS not in ids.tolist()  # text tokens only; BOS comes with each window
    got, n = perplexity(model, BOS_TOK, TEXTS, max_tokens=150, window=window, stride=stride)
    ref, ref_n = bos_windows_by_hand(model, ids, window, stride)
    assert n == ref_n == 150  # every text token, the first one too (predicted from BOS)
    assert got == pytest.approx(ref, rel=1e-4)


def test_every_perplexity_window_starts_with_bos_and_fits_the_window():
    model = tiny.build("gemma3")
    seen: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"])[0].tolist()), with_kwargs=True
    )
    perplexity(model, BOS_TOK, TEXTS, max_tokens=100, window=16, stride=10)
    assert len(seen) == 1 + -(-(100 - 15) // 10)
    assert all(w[0] == BOS and BOS not in w[1:] and len(w) <= 16 for w in seen)
    seen.clear()
    perplexity(model, TOK, TEXTS, max_tokens=100, window=16, stride=10)  # no BOS: text windows as before
    assert seen[0] == token_stream(TOK, TEXTS, 16).tolist()


def test_generation_prompts_start_with_bos_for_a_tokenizer_that_adds_it():
    model = tiny.build("llama")
    prompts, _ = passages(token_stream(BOS_TOK, TEXTS), 2, 4)
    for tok, lead in ((BOS_TOK, [BOS]), (TOK, [])):
        first: list[torch.Tensor] = []
        handle = model.register_forward_pre_hook(
            lambda m, args, kwargs, first=first: first.append(kwargs["input_ids"]) if not first else None,
            with_kwargs=True,
        )
        out = continuations(model, tok, prompts, 4)
        handle.remove()
        assert len(out) == 2
        assert first[0].tolist() == [lead + p for p in prompts.tolist()]


def test_perplexity_rejects_a_window_past_the_context_and_empty_text():
    model = tiny.build("llama")  # 256 positions
    with pytest.raises(EvalError, match="context is 256 tokens"):
        perplexity(model, TOK, [tiny.TEXT], max_tokens=400, window=300, stride=100)
    with pytest.raises(EvalError, match="needs at least 2"):
        perplexity(model, TOK, ["a"], max_tokens=10, window=8, stride=4)


# ----------------------------------------------------------------------------- accuracy


class UnigramLM(torch.nn.Module):
    """A stub causal LM whose next-token distribution is softmax(bias) whatever the context."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = torch.nn.Parameter(bias)
        self.config = SimpleNamespace(max_position_embeddings=None, vocab_size=bias.numel())

    def forward(self, input_ids, cache=None, use_cache=False, **kw):
        return CausalLMOutputWithPast(logits=self.bias.expand(*input_ids.shape, -1))


def test_label_scores_of_a_unigram_stub_are_the_word_log_likelihoods():
    bias = torch.zeros(tiny.VOCAB)
    bias[TOK.convert_tokens_to_ids("p")] = 4.0  # "p" is likely: " positive" must win
    model = UnigramLM(bias)
    logp = torch.log_softmax(bias, -1)
    scores = label_scores(model, TOK, "a fine film", ["negative", "positive"], demo_prefix(model, TOK, []))
    for name, score in zip(["negative", "positive"], scores, strict=True):
        by_hand = sum(logp[t].item() for t in TOK(" " + name)["input_ids"])
        assert score == pytest.approx(by_hand, rel=1e-5)
    texts, labels = labelled()
    _, scored = split_shots(labels, shots=4, seed=0)
    share_positive = sum(labels[i] == "positive" for i in scored) / len(scored)
    assert label_accuracy(model, TOK, texts, labels, shots=4) == pytest.approx(share_positive)


def test_label_scores_with_the_cached_prefix_equal_one_full_forward():
    model = tiny.build("llama")
    demos = [("great film", "positive"), ("awful film", "negative")]
    prefix = demo_prefix(model, TOK, demos)
    scores = label_scores(model, TOK, "a fine film", ["negative", "positive"], prefix)
    context = TOK("Review: great film\nSentiment: positive\n\nReview: awful film\nSentiment: negative\n\n")["input_ids"]
    query = TOK("Review: a fine film\nSentiment:")["input_ids"]
    for name, score in zip(["negative", "positive"], scores, strict=True):
        word = TOK(" " + name)["input_ids"]
        ids = torch.tensor([context + query + word])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(context) + len(query)
        by_hand = sum(logp[start + j - 1, t].item() for j, t in enumerate(word))
        assert score == pytest.approx(by_hand, abs=1e-4)
    assert prefix[0] == len(context)


def test_split_shots_takes_classes_in_turn_and_never_scores_a_shot():
    _, labels = labelled(30)
    shots, scored = split_shots(labels, shots=4, examples=10, seed=3)
    assert [labels[i] for i in shots].count("positive") == 2
    assert len(scored) == 10 and not set(shots) & set(scored)
    assert split_shots(labels, shots=4, examples=10, seed=3) == (shots, scored)
    assert split_shots(labels, shots=4, examples=10, seed=4) != (shots, scored)
    with pytest.raises(EvalError, match="leave none to score"):
        split_shots(labels[:3], shots=3)


def test_classifier_head_is_argmax_with_names_from_id2label_or_sorted():
    model = tiny.build("bert", task="sequence_classification")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))  # output 1 always wins
    texts, labels = labelled()
    _, scored = split_shots(labels, shots=2, seed=0)
    share = {c: sum(labels[i] == c for i in scored) / len(scored) for c in ("negative", "positive")}
    # LABEL_0/LABEL_1 are not the data's names: output 1 is the second sorted name.
    assert label_accuracy(model, TOK, texts, labels, shots=2) == pytest.approx(share["positive"])
    model.config.id2label = {0: "POSITIVE", 1: "NEGATIVE"}
    assert label_accuracy(model, TOK, texts, labels, shots=2) == pytest.approx(share["negative"])


# ----------------------------------------------------------------------------- generation


def test_generation_metrics_of_identical_strings():
    refs = ["the cat sat on the mat", "a dog ran far away"]
    m = generation_metrics(refs, refs)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == pytest.approx(1.0)
    assert m["cer"] == 0.0


def test_generation_metrics_by_hand():
    ref = "the cat sat on the mat"
    assert generation_metrics(["the cat sat on the hat"], [ref])["cer"] == pytest.approx(1 / len(ref))
    # Same length, so no brevity penalty; n-gram precisions 5/6, 3/5, 2/4, 1/3.
    bleu = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])["bleu"] == pytest.approx(
        bleu, rel=1e-6
    )
    # "the cat sat" vs the six-word ref: P=1, R=1/2 for unigrams and LCS; bigrams P=1, R=2/5.
    m = generation_metrics(["the cat sat"], [ref])
    assert m["rouge1"] == pytest.approx(2 / 3)
    assert m["rougeL"] == pytest.approx(2 / 3)
    assert m["rouge2"] == pytest.approx(4 / 7)
    # ROUGE is a mean over pairs; CER pools the edits over all reference characters.
    m = generation_metrics(["the cat sat", ref], [ref, ref])
    assert m["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["cer"] == pytest.approx((len(ref) - len("the cat sat")) / (2 * len(ref)))
    with pytest.raises(EvalError):
        generation_metrics(["a"], ["a", "b"])


def test_passages_are_evenly_spaced_prompts_and_references():
    ids = torch.arange(1000)
    prompts, refs = passages(ids, 4, 8)
    assert prompts.shape == (4, 64) and refs.shape == (4, 8)
    assert prompts[:, 0].tolist() == [0, 309, 619, 928]  # 0 .. n - 72, evenly
    assert torch.equal(refs[:, 0], prompts[:, -1] + 1)
    with pytest.raises(EvalError, match="at least 72"):
        passages(torch.arange(50), 4, 8)


# ----------------------------------------------------------------------------- cost


def test_latency_returns_positive_finite_numbers():
    # 15 decode steps, so the generate(16) - generate(1) difference stands well clear of timer noise.
    out = latency(tiny.build("llama"), batch=2, length=8, new_tokens=16, repeats=3, warmup=1)
    assert set(out) == {"prefill_ms_per_token", "decode_ms_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"}
    for kind in ("prefill", "decode"):
        assert 0 < out[f"{kind}_ms_per_token"] < math.inf
        assert out[f"{kind}_tokens_per_s"] == pytest.approx(1000 / out[f"{kind}_ms_per_token"])
    cls = latency(tiny.build("bert", task="sequence_classification"), batch=1, length=8, new_tokens=4, repeats=2)
    assert set(cls) == {"prefill_ms_per_token", "prefill_tokens_per_s"}


@pytest.mark.parametrize("tied", [True, False])
def test_param_counts_of_a_tiny_llama_by_hand(tied):
    V, d, L, heads, kv, inter = tiny.VOCAB, 32, 2, 4, 2, 64
    model = tiny.build("llama", tie_word_embeddings=tied)
    head_dim = d // heads
    block = d * d * 2 + 2 * d * kv * head_dim + 3 * d * inter + 2 * d  # q, o; k, v; gate, up, down; 2 norms
    non_embedding = L * block + d  # + final norm
    total = non_embedding + V * d + (0 if tied else V * d)
    assert param_counts(model) == {"params": total, "non_embedding_params": non_embedding}


def test_size_on_disk_counts_weight_files_only(tmp_path):
    folder = tiny.save_model(tmp_path / "m", "llama")
    (folder / "extra.bin").write_bytes(b"x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "old.safetensors").write_bytes(b"x" * 5000)  # e.g. a checkpoint: not this model
    expected = os.path.getsize(folder / "model.safetensors") + 1000
    assert size_on_disk(folder) == pytest.approx(expected / 2**20)
    assert size_on_disk("HuggingFaceTB/SmolLM2-135M") is None


def test_retention_formulas():
    t = {
        "perplexity": 20.0,
        "accuracy": 0.8,
        "bleu": 10.0,
        "rouge1": 0.5,
        "rouge2": 0.2,
        "rougeL": 0.4,
        "cer": 0.5,
        "prefill_ms_per_token": 2.0,
        "decode_ms_per_token": 9.0,
        "params": 100,
        "size_mb": 5.0,
    }
    s = {
        "perplexity": 40.0,
        "accuracy": 0.6,
        "bleu": 5.0,
        "rouge1": 0.25,
        "rouge2": 0.1,
        "rougeL": 0.2,
        "cer": 1.0,
        "prefill_ms_per_token": 0.5,
        "decode_ms_per_token": 3.0,
        "params": 25,
        "size_mb": 1.0,
    }
    assert retention(t, s) == pytest.approx(
        {
            "perplexity": 0.5,
            "accuracy": 0.75,
            "bleu": 0.5,
            "rouge1": 0.5,
            "rouge2": 0.5,
            "rougeL": 0.5,
            "cer": 0.5,
            "prefill_speedup": 4.0,
            "decode_speedup": 3.0,
            "params": 0.25,
        }
    )
    assert retention({"bleu": 0.0, "accuracy": 0.5}, {"bleu": 3.0}) == {"bleu": None}


# ----------------------------------------------------------------------------- end to end

SETTINGS = dict(ppl_tokens=300, window=64, stride=32, examples=8, shots=2, prompts=3, new_tokens=6, latency_len=16)
SETTINGS_KEYS = {
    "text",
    "labelled",
    "device",
    "dtype",
    "ppl_tokens",
    "window",
    "stride",
    "examples",
    "shots",
    "prompts",
    "new_tokens",
    "latency_batch",
    "latency_len",
}
METRICS = {
    "perplexity",
    "bits_per_byte",
    "bits_per_char",
    "ppl_tokens_scored",
    "bos",
    "accuracy",
    "accuracy_above_chance",
    "accuracy_chance",
    "accuracy_examples",
    "bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "cer",
    "prefill_ms_per_token",
    "decode_ms_per_token",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "params",
    "non_embedding_params",
    "size_mb",
    "gen_teacher_nll",
    "gen_distinct2",
}
FIDELITY = {f"{k}_vs_teacher" for k in ("bleu", "rouge1", "rouge2", "rougeL", "cer")}
RETENTION = {
    "perplexity",
    "accuracy",
    "accuracy_above_chance",
    "bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "cer",
    "prefill_speedup",
    "decode_speedup",
    "params",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return SimpleNamespace(
        teacher=tiny.save_model(root / "teacher", "llama", layers=2, width=64),
        student=tiny.save_model(root / "student", "llama", layers=1, width=32, seed=1),
        corpus=tiny.write_corpus(root / "corpus", docs=4),
        csv=write_csv(root / "sentiment.csv"),
        root=root,
    )


def test_evaluate_models_writes_eval_json(world, tmp_path):
    models = {"teacher": str(world.teacher), "student": str(world.student), "same": str(world.teacher)}
    settings = EvalSettings(text=str(world.corpus), labelled=str(world.csv), dtype="float32", **SETTINGS)
    result = evaluate_models(models, settings, teacher="teacher", out=tmp_path, progress=False)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert set(written) == {"settings", "models", "retention", "warnings"}
    assert set(written["settings"]) == SETTINGS_KEYS
    assert written["settings"]["device"] == "cpu" and written["settings"]["window"] == 64
    assert list(written["models"]) == ["teacher", "student", "same"]
    assert set(written["models"]["teacher"]["metrics"]) == METRICS
    assert set(written["models"]["student"]["metrics"]) == METRICS | FIDELITY | {"gen_rougeL"}
    assert written["models"]["student"]["path"] == str(world.student)
    assert set(written["retention"]) == {"student", "same"}
    assert set(written["retention"]["student"]) == RETENTION
    # The teacher evaluated again under another name: same scores, same continuations.
    same, kept = written["models"]["same"]["metrics"], written["retention"]["same"]
    assert same["cer_vs_teacher"] == 0  # (BLEU needs 4-grams; 6 random bytes hold none)
    assert same["gen_rougeL"] == 1.0  # the same greedy ids; and the same samples, judged alike
    for key in (
        "perplexity",
        "accuracy",
        "bleu",
        "rougeL",
        "cer",
        "params",
        "size_mb",
        "gen_teacher_nll",
        "gen_distinct2",
    ):
        assert same[key] == pytest.approx(written["models"]["teacher"]["metrics"][key], rel=1e-6), key
    assert kept["perplexity"] == pytest.approx(1.0) and kept["accuracy"] == pytest.approx(1.0) and kept["params"] == 1.0
    # And the numbers are the metric functions' own.
    teacher = written["models"]["teacher"]["metrics"]
    model = tiny.AutoModelForCausalLM.from_pretrained(world.teacher)
    ppl, n = perplexity(
        model, TOK, [p.read_text() for p in sorted(world.corpus.glob("*.txt"))], max_tokens=300, window=64, stride=32
    )
    assert (teacher["perplexity"], teacher["ppl_tokens_scored"]) == (pytest.approx(ppl, rel=1e-5), n)
    assert teacher["accuracy_examples"] == 8
    # Chance: the majority class's share of the scored examples (the CSV is 2/3 positive), not 1/2.
    texts, labels, _ = read_labelled(str(world.csv))
    _, scored = split_shots(labels, shots=2, examples=8)
    majority = max(sum(labels[i] == c for i in scored) for c in ("positive", "negative")) / 8
    assert majority > 0.5
    for name in ("teacher", "student", "same"):
        m = written["models"][name]["metrics"]
        assert m["accuracy_chance"] == majority and m["accuracy_above_chance"] == pytest.approx(
            m["accuracy"] - majority
        ), name
    margin = teacher["accuracy"] - majority
    assert kept["accuracy_above_chance"] == (pytest.approx(1.0) if margin > 0 else None)
    assert written["warnings"] == ([near_chance(teacher)] if margin < NEAR_CHANCE else [])
    assert teacher["bos"] is False  # the byte tokenizer adds no BOS
    assert teacher["params"] == param_counts(model)["params"]


def test_eval_of_a_model_whose_tokenizer_adds_bos_records_it(world, tmp_path):
    model_dir = tiny.save_model(tmp_path / "bos", "llama", layers=1, width=32, bos=True)
    settings = EvalSettings(text=str(world.corpus), skip=("accuracy", "latency"), dtype="float32", **SETTINGS)
    metrics = evaluate_models({"model": str(model_dir)}, settings, progress=False)["models"]["model"]["metrics"]
    assert metrics["bos"] is True
    texts = [p.read_text() for p in sorted(world.corpus.glob("*.txt"))]
    model = tiny.AutoModelForCausalLM.from_pretrained(model_dir)
    ppl, n = perplexity(model, BOS_TOK, texts, max_tokens=300, window=64, stride=32)
    assert (metrics["perplexity"], metrics["ppl_tokens_scored"]) == (pytest.approx(ppl, rel=1e-5), n) and n == 300


def test_models_with_different_tokenizers_are_compared_by_bits_per_byte(world, tmp_path):
    tok = _bpe_tokenizer()
    other = tiny.save_model(tmp_path / "bpe", "llama", layers=1, width=32)  # its 272 rows hold the 270 tokens
    tok.save_pretrained(other)  # the model now reads text through a tokenizer of its own
    settings = EvalSettings(text=str(world.corpus), skip=("accuracy", "latency", "generation"), **SETTINGS)
    result = evaluate_models({"teacher": str(world.teacher), "bpe": str(other)}, settings, teacher="teacher")
    assert any("tokenizers differ" in w and "bits per byte" in w for w in result["warnings"])
    for role in ("teacher", "bpe"):
        assert 0 < result["models"][role]["metrics"]["bits_per_byte"] < 20
    same = evaluate_models({"teacher": str(world.teacher), "student": str(world.student)}, settings, teacher="teacher")
    assert not any("tokenizers differ" in w for w in same["warnings"])


def test_skipped_groups_are_absent_and_no_teacher_means_no_retention(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKD_CACHE", str(tmp_path / "empty"))  # no packaged data needed when skipped
    settings = EvalSettings(skip=("perplexity", "accuracy", "generation"), latency_len=8, new_tokens=3)
    result = evaluate_models({"model": str(world.student)}, settings, progress=False)
    assert set(result["models"]["model"]["metrics"]) == {
        "prefill_ms_per_token",
        "decode_ms_per_token",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "params",
        "non_embedding_params",
        "size_mb",
    }
    assert result["retention"] == {}
    assert result["settings"]["text"] is None and result["settings"]["labelled"] is None


def test_packaged_defaults_come_from_the_asset_cache(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALIGNKD_CACHE", str(cache))
    settings = EvalSettings(skip=("latency", "generation"), **SETTINGS)
    with pytest.raises(
        EvalError,
        match=r"^no held-out text given and the packaged text is not prepared; run `alignkd assets` or pass --text$",
    ):
        evaluate_models({"model": str(world.student)}, settings, progress=False)
    tiny.write_corpus(cache / "corpus" / "moby_dick", docs=2)
    with pytest.raises(EvalError, match="pass --labelled"):
        evaluate_models({"model": str(world.student)}, settings, progress=False)
    (cache / "sentiment").mkdir()
    write_csv(cache / "sentiment" / "test.csv")
    result = evaluate_models({"model": str(world.student)}, settings, progress=False)
    assert result["settings"]["text"] == str(cache / "corpus" / "moby_dick")
    assert result["settings"]["labelled"] == str(cache / "sentiment" / "test.csv")


def test_cli_eval_end_to_end(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "eval",
            str(world.student),
            "--teacher",
            str(world.teacher),
            "--baseline",
            f"ce={world.student}",
            "--text",
            str(world.corpus),
            "--labelled",
            str(world.csv),
            "--out",
            str(out),
            "--ppl-tokens",
            "200",
            "--window",
            "64",
            "--stride",
            "32",
            "--examples",
            "6",
            "--shots",
            "2",
            "--prompts",
            "2",
            "--new-tokens",
            "5",
            "--latency-len",
            "8",
            "--skip",
            "latency",
        ]
    )
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["models"]) == ["teacher", "student", "ce"]
    assert result["settings"]["ppl_tokens"] == 200 and result["settings"]["examples"] == 6
    assert "prefill_ms_per_token" not in result["models"]["student"]["metrics"]
    assert set(result["retention"]) == {"student", "ce"}
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "student kept" in printed and "eval.json" in printed


def test_every_metric_eval_writes_is_in_the_one_catalogue():
    assert set(BY_KEY) >= METRICS | FIDELITY
    assert {m.key for m in CATALOGUE if m.fidelity} == FIDELITY
    assert {k.key for k in KEPT} == RETENTION


def _result_of(names: list[str]) -> dict:
    """An eval.json of real-looking numbers for a teacher and the other ``names``."""
    teacher = {
        "perplexity": 18.12,
        "ppl_tokens_scored": 16128,
        "bos": False,
        "accuracy": 0.81,
        "accuracy_above_chance": 0.29,
        "accuracy_chance": 0.52,
        "accuracy_examples": 200,
        "bleu": 3.2,
        "rouge1": 0.214,
        "rouge2": 0.052,
        "rougeL": 0.184,
        "cer": 0.703,
        "prefill_ms_per_token": 1.234,
        "decode_ms_per_token": 9.01,
        "prefill_tokens_per_s": 810.4,
        "decode_tokens_per_s": 111.0,
        "params": 134515008,
        "non_embedding_params": 106204416,
        "size_mb": 513.1,
        "gen_teacher_nll": 2.31,
        "gen_distinct2": 0.87,
        "bits_per_byte": 1.123,
        "bits_per_char": 1.187,
    }
    models = {"teacher": {"path": "t", "metrics": teacher}}
    for i, name in enumerate(names):
        m = {k: v * (1.5 + i) if isinstance(v, float) else v for k, v in teacher.items()}
        m.update({f"{k}_vs_teacher": 0.25 + i for k in ("bleu", "rouge1", "rouge2", "rougeL", "cer")})
        m["gen_rougeL"] = 0.3 + 0.1 * i
        models[name] = {"path": name, "metrics": m}
    kept = {n: retention(teacher, e["metrics"]) for n, e in models.items() if n != "teacher"}
    return {"settings": {}, "models": models, "retention": kept, "warnings": []}


def test_eval_table_fits_80_columns_without_cutting_a_cell():
    names = ["student", "ce-baseline", "kl-only", "feature"]
    out = io.StringIO()
    print_table(_result_of(names), Console(width=80, file=out, force_terminal=False))
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ["teacher", *names]:
        assert re.search(rf"\b{re.escape(name)}\b", text), name
        if name != "teacher":
            assert f"{name} kept" in text
    # Every metric row in every table, whole.
    for m in CATALOGUE:
        if not m.fidelity or m.key.startswith("bleu"):
            assert m.label in text, m.label


def test_eval_table_is_one_table_when_it_fits():
    out = io.StringIO()
    print_table(_result_of(["student"]), Console(width=200, file=out, force_terminal=False))
    assert out.getvalue().count("Perplexity") == 1 and "student kept" in out.getvalue()


def test_settings_defaults_are_the_cli_defaults():
    args = cli.build_parser().parse_args(["eval", "m"])
    s = EvalSettings()
    for name in (
        "text",
        "labelled",
        "ppl_tokens",
        "window",
        "stride",
        "examples",
        "shots",
        "prompts",
        "new_tokens",
        "latency_batch",
        "latency_len",
        "dtype",
    ):
        assert getattr(s, name) == getattr(args, name), name


# ----------------------------------------------------------------------------- bad input


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignkd eval: error: ") and "\n" not in err, err
    return err


def test_missing_model_folder_is_one_line(world, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    with pytest.raises(EvalError, match="student: model folder not found"):
        evaluate_models(
            {"teacher": str(world.teacher), "student": missing}, EvalSettings(), teacher="teacher", progress=False
        )
    err = one_line_error(capsys, ["eval", missing, "--teacher", str(world.teacher), "--out", str(tmp_path)])
    assert "model folder not found" in err and missing in err
    assert not (tmp_path / "eval.json").exists()


def test_csv_without_columns_is_one_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars\ngood,5\n")
    with pytest.raises(EvalError, match="has no column 'text'.*needs text and label columns"):
        evaluate_models(
            {"model": str(world.student)},
            EvalSettings(labelled=str(bad), skip=("perplexity", "generation", "latency")),
            progress=False,
        )
    err = one_line_error(
        capsys, ["eval", str(world.student), "--labelled", str(bad), "--skip", "perplexity", "generation", "latency"]
    )
    assert "no column 'text'" in err


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--stride", "600"], "stride 600 is longer than window 512"),
        (["--baseline", "oops"], "is not NAME=PATH"),
        (["--baseline", "student=x"], "is taken"),
    ],
)
def test_bad_settings_are_one_line(world, tmp_path, capsys, argv_tail, message):
    err = one_line_error(
        capsys, ["eval", str(world.student), "--teacher", str(world.teacher), "--text", str(world.corpus), *argv_tail]
    )
    assert message in err


def test_empty_text_is_an_eval_error(world, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    settings = EvalSettings(text=str(tmp_path / "empty.txt"), skip=("accuracy", "latency"))
    with pytest.raises(EvalError, match="no text found"):
        evaluate_models({"model": str(world.student)}, settings, progress=False)


# ----------------------------------------------------------------------------- retention above chance


def test_chance_is_the_majority_share():
    assert chance_level(["a", "b", "a", "a"]) == 0.75
    assert chance_level(["x", "y", "z"]) == pytest.approx(1 / 3)
    assert chance_level(["pos"] * 5) == 1.0


def test_retention_above_chance_of_a_teacher_near_chance():
    """The demo's case: a teacher at 63 % on two balanced classes, a student at 61 %."""
    chance = 0.5
    teacher = {"accuracy": 0.63, "accuracy_above_chance": 0.63 - chance, "accuracy_chance": chance}
    student = {"accuracy": 0.61, "accuracy_above_chance": 0.61 - chance, "accuracy_chance": chance}
    kept = retention(teacher, student)
    assert kept["accuracy"] == pytest.approx(0.61 / 0.63)  # 96.8 %: looks like nearly all of it
    assert kept["accuracy_above_chance"] == pytest.approx(0.11 / 0.13)  # 84.6 % of what the teacher adds to chance
    # A student below chance keeps a negative share; a teacher at or below chance leaves nothing to keep.
    below = {"accuracy_above_chance": 0.45 - chance}
    assert retention(teacher, below)["accuracy_above_chance"] == pytest.approx(-0.05 / 0.13)
    for t in (0.5, 0.4):
        assert retention({"accuracy_above_chance": t - chance}, student)["accuracy_above_chance"] is None


@pytest.mark.parametrize(
    ("accuracy", "chance", "says"),
    [
        (0.63, 0.5, "only 13.0 points above chance (50.0%"),
        (0.50, 0.5, "is not above chance"),
        (0.40, 0.5, "is not above chance"),
        (0.40, 0.26, "only 14.0 points above chance (26.0%"),
        (0.65, 0.5, None),  # 15 points: no longer near
        (0.81, 0.52, None),
    ],
)
def test_near_chance_warning(accuracy, chance, says):
    warning = near_chance({"accuracy": accuracy, "accuracy_chance": chance})
    if says is None:
        assert warning is None
    else:
        assert says in warning and "\n" not in warning and warning.startswith("the teacher's accuracy")
    assert (
        near_chance({"accuracy": 0.55}) is None and near_chance({}) is None
    )  # an eval.json from before chance was recorded


def test_eval_table_shows_the_retention_above_chance_and_the_warning():
    result = _result_of(["student"])
    teacher = result["models"]["teacher"]["metrics"]
    teacher.update(accuracy=0.6, accuracy_above_chance=0.6 - 0.52)  # chance 0.52
    result["retention"]["student"] = retention(teacher, result["models"]["student"]["metrics"])
    result["warnings"] = [near_chance(teacher)]
    out = io.StringIO()
    print_table(result, Console(width=300, file=out, force_terminal=False))
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "Accuracy above chance" in line)
    student_margin = result["models"]["student"]["metrics"]["accuracy_above_chance"]
    assert "+8.0 pts" in row and f"{100 * student_margin:+.1f} pts" in row
    assert f"{100 * student_margin / (0.6 - 0.52):.1f}%" in row  # (student - chance) / (teacher - chance), beside it
    assert "Chance accuracy (majority class)" in text
    assert "warning: the teacher's accuracy (60.0%) is only 8.0 points above chance (52.0%" in " ".join(text.split())


def test_demo_headline_judges_generation_and_shows_the_perplexity_kept():
    from alignkd import demo

    result = _result_of(["student", "baseline"])
    rows = {r[0]: r[1:] for r in demo.headline(result)}
    kept = result["retention"]
    assert rows["Perplexity retained"] == (
        "",
        f"{100 * kept['student']['perplexity']:.1f}%",
        f"{100 * kept['baseline']['perplexity']:.1f}%",
    )
    assert rows["Teacher-judged NLL of samples (lower is better)"][0] == "2.310"
    assert rows["Distinct-2 of samples (higher is better)"][0] == "0.870"
    assert not any("ccuracy" in label for label in rows)
