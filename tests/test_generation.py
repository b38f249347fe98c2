"""Generated batches: the sampler against ``model.generate``, which positions count, the source draw, the teacher's
stored samples, and runs on the student's and the teacher's samples.

The two-process run is in ``test_multiprocess.py``, the kill-and-resume one in ``test_safety.py``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_engine import make_cfg, make_run

import alignkd
from alignkd import testing as tiny
from alignkd.config import load_config
from alignkd.engine.step import term_losses
from alignkd.errors import ConfigError
from alignkd.losses import kl_div
from alignkd.models.generate import Sampling, TopK, generate, join, left_pad, pick
from alignkd.teacher.samples import TeacherSamples

PROMPTS = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12]), torch.tensor([30, 31, 32, 33])]


# ----------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_greedy_generation_of_left_padded_prompts_equals_model_generate_one_prompt_at_a_time(family):
    model = tiny.build(family)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    eos = 1
    got = generate(model, ids, mask, Sampling(10, temperature=0), [0, 1, 2], eos_ids=[eos], pad_id=0)
    for i, p in enumerate(PROMPTS):
        want = model.generate(
            p[None],
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )[0]
        assert got.input_ids[i][got.mask[i]].tolist() == want.tolist()
        assert got.generated[i].sum() == len(want) - len(p)
        assert not got.generated[i][: len(p)].any()  # the prompt is never a generated token


def test_a_row_stops_at_eos_and_the_rest_of_it_is_padding():
    model = tiny.build("llama")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    first = generate(model, ids, mask, Sampling(6, temperature=0), [0, 1, 2], eos_ids=[], pad_id=0)
    eos = int(first.input_ids[0, len(PROMPTS[0]) + 1])  # row 0's second new token: make it the EOS
    got = generate(model, ids, mask, Sampling(6, temperature=0), [0, 1, 2], eos_ids=[eos], pad_id=0)
    assert got.generated[0].sum() == 2 and got.input_ids[0, len(PROMPTS[0]) + 1] == eos
    assert not got.mask[0, len(PROMPTS[0]) + 2 :].any()


def test_a_sampled_row_does_not_depend_on_the_rows_beside_it():
    model = tiny.build("llama")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    s = Sampling(8, temperature=1.0, top_p=0.9)
    together = generate(model, ids, mask, s, [7, 8, 9], eos_ids=[1], pad_id=0)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, p[None], torch.ones(1, len(p), dtype=torch.bool), s, [7 + i], eos_ids=[1], pad_id=0)
        assert together.input_ids[i][together.mask[i]].tolist() == alone.input_ids[0][alone.mask[0]].tolist()
    other_seed = generate(model, ids, mask, s, [70, 80, 90], eos_ids=[1], pad_id=0)
    assert not torch.equal(other_seed.input_ids, together.input_ids)


def test_pick_draws_only_from_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(0)]
    draws = torch.tensor([pick(logits, Sampling(1, 1.0, top_p=0.7), gens)[0] for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    draws = torch.tensor([pick(logits, Sampling(1, 1.0), gens)[0] for _ in range(4000)])
    assert (draws == 3).float().mean().item() == pytest.approx(0.05, abs=0.015)
    hot = torch.tensor([pick(logits, Sampling(1, 4.0), gens)[0] for _ in range(4000)])
    assert (hot == 3).float().mean() > 0.12  # a higher temperature flattens the distribution
    assert pick(logits, Sampling(1, 0.0), gens).tolist() == [0]


def test_only_positions_that_predict_a_generated_token_are_scored():
    gen = join([torch.tensor([4, 5, 6]), torch.tensor([7])], [torch.tensor([8, 1]), torch.tensor([9, 10, 11])], 0)
    assert gen.input_ids.tolist() == [[4, 5, 6, 8, 1], [7, 9, 10, 11, 0]]
    assert gen.mask.tolist() == [[True] * 5, [True] * 4 + [False]]
    # Position i predicts token i + 1: row 0 scores positions 2 (-> 8) and 3 (-> EOS), never the prompt's own.
    assert gen.scored().tolist() == [[False, False, True, True, False], [True, True, True, False, False]]


# ----------------------------------------------------------------------------- losses on generated text


@pytest.fixture(scope="module")
def run_on_policy(teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("onpolicy")
    cfg = make_cfg(teacher, corpus, out, losses=[{"type": "kl"}, {"type": "ce"}, {"type": "hidden"}])
    cfg["train"]["fused_head"] = False  # the logits themselves, to compare with the reference
    cfg["generation"] = {"sources": {"student": 1.0}, "prompt_tokens": 4, "max_new_tokens": 6}
    return make_run(cfg)


def test_the_losses_of_a_generated_batch_count_the_sampled_tokens_only(run_on_policy):
    run = run_on_policy
    drawn = run.sources.draw(run, 0, 0, seed=0)
    assert drawn.source == "student" and drawn.new_tokens > 0
    b = drawn.batch
    assert b.scored is not None and b.index is None
    with torch.no_grad():
        s = run.unwrapped.student(input_ids=b.input_ids, attention_mask=b.mask.long()).logits
        t = run.teacher.model(input_ids=b.input_ids, attention_mask=b.mask.long()).logits
        student = run.side(b.input_ids, b.mask)
        teacher = run.teacher.record(b, run.accelerator.device, False)
        got = term_losses(run, b, student, teacher, [1.0, None, None])
    v = run.vocab
    rows, cols = b.scored.nonzero(as_tuple=True)  # the positions before each sampled token
    assert len(rows) == drawn.new_tokens
    log_s, log_t = s[rows, cols, :v].log_softmax(-1), t[rows, cols, :v].log_softmax(-1)
    want_kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()  # forward KL, averaged over the sampled tokens
    assert got["kl"].item() == pytest.approx(want_kl.item(), rel=1e-5)
    want_ce = F.cross_entropy(s[rows, cols, :v], b.input_ids[rows, cols + 1])
    assert got["ce"].item() == pytest.approx(want_ce.item(), rel=1e-5)
    # The prompt's positions, scored as well, would give other values.
    everything = kl_div(s[..., :v], t[..., :v], b.mask, kind="forward")
    assert everything.item() != pytest.approx(want_kl.item(), rel=1e-3)


# ----------------------------------------------------------------------------- which source


def _sources(sources, schedule=None):
    from alignkd.engine.sources import Sources

    s = Sources.__new__(Sources)
    cfg = load_config(
        data={
            "teacher": {"path": "t"},
            "student": {"path": "s"},
            "data": {"train": "d", "seq_len": 16},
            "losses": [{"type": "kl"}],
            "generation": {"sources": sources, "student_schedule": schedule, "prompt_tokens": 4},
        }
    )
    s.cfg, s.g = cfg, cfg.generation
    return s


def test_sources_are_drawn_in_their_proportions_and_the_same_on_every_process():
    s = _sources({"dataset": 0.25, "student": 0.5, "teacher": 0.25})
    draws = [s.source(step, k, 1000) for step in range(1000) for k in range(2)]
    for name, p in (("dataset", 0.25), ("student", 0.5), ("teacher", 0.25)):
        assert draws.count(name) / len(draws) == pytest.approx(p, abs=0.04)
    assert draws == [
        _sources({"dataset": 0.25, "student": 0.5, "teacher": 0.25}).source(st, k, 1000)
        for st in range(1000)
        for k in range(2)
    ]


def test_the_student_schedule_moves_the_on_policy_share_and_the_rest_keeps_its_proportions():
    s = _sources({"dataset": 0.6, "teacher": 0.2, "student": 0.2}, {"kind": "linear", "start": 0.0, "end": 1.0})
    assert s.probabilities(0, 100) == pytest.approx({"student": 0.0, "dataset": 0.75, "teacher": 0.25})
    assert s.probabilities(50, 100) == pytest.approx({"student": 0.5, "dataset": 0.375, "teacher": 0.125})
    assert s.probabilities(100, 100)["student"] == pytest.approx(1.0)
    early = [s.source(step, 0, 1000) for step in range(100)]
    late = [s.source(step, 0, 1000) for step in range(900, 1000)]
    assert early.count("student") < 25 < 75 < late.count("student")


# ----------------------------------------------------------------------------- the teacher's stored samples


def test_stored_samples_are_kept_whole_and_read_back_by_a_store_opened_later(tmp_path):
    store = TeacherSamples(tmp_path / "s", {"k": 1})
    assert len(store) == 0 and not (tmp_path / "s").exists()  # nothing written until a sample is
    store.put([3, 9], [torch.tensor([5, 6, 1]), torch.tensor([7])])
    store.put([3, 4], [torch.tensor([0, 0]), torch.tensor([])])  # 3 is kept as first stored
    again = TeacherSamples(tmp_path / "s", {"k": 1})
    assert [c.tolist() for c in again.get([3, 9, 4])] == [[5, 6, 1], [7], []]
    assert again.missing([3, 5]) == [5]
    assert json.loads((tmp_path / "s" / "meta.json").read_text()) == {"k": 1}
    assert not list((tmp_path / "s").glob(".*tmp"))
    # With the teacher's top-k behind each token: read back with the tokens, row by row.
    top = [TopK(torch.tensor([[4, 2]] * n, dtype=torch.int32), torch.randn(n, 2), torch.randn(n)) for n in (2, 1)]
    store.put([20, 21], [torch.tensor([8, 9]), torch.tensor([4])], top)
    again = TeacherSamples(tmp_path / "s", {"k": 1})
    for want, got in zip(top, again.get_top([20, 21]), strict=True):
        assert torch.equal(got.ids, want.ids) and torch.equal(got.logprobs, want.logprobs)
        assert torch.equal(got.tail, want.tail)


def _sequence_cfg(teacher, corpus, out, **generation):
    cfg = make_cfg(teacher, corpus, out, losses=[{"type": "ce"}, {"type": "kl"}], steps=3)
    cfg["generation"] = {"sources": {"teacher": 1.0}, "prompt_tokens": 4, "max_new_tokens": 6, **generation}
    return cfg


def test_teacher_samples_are_made_once_and_reused_by_a_later_run(teacher, corpus, tmp_path, capsys):
    samples = tmp_path / "samples"
    alignkd.distill(_sequence_cfg(teacher, corpus, tmp_path / "a", samples=str(samples)))
    first = " ".join(capsys.readouterr().err.split())
    assert "teacher samples: none stored yet" in first
    stores = list(samples.iterdir())
    assert len(stores) == 1
    kept = TeacherSamples(stores[0], {})
    assert len(kept) == 3 * 4  # 3 steps of 4 prompts (blocks), each stored once
    alignkd.distill(_sequence_cfg(teacher, corpus, tmp_path / "b", samples=str(samples)))
    assert f"teacher samples: reusing {len(kept)} stored" in " ".join(capsys.readouterr().err.split())
    assert list(samples.iterdir()) == stores and len(TeacherSamples(stores[0], {})) == len(kept)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a if r["split"] == "train"] == [r["loss"] for r in b if r["split"] == "train"]
    # Another temperature is another store.
    alignkd.distill(_sequence_cfg(teacher, corpus, tmp_path / "c", samples=str(samples), temperature=0.5))
    assert len(list(samples.iterdir())) == 2


def test_generation_keeps_the_top_k_behind_each_sampled_token_at_the_position_that_predicts_it():
    model = tiny.build("llama")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    k, vocab = 5, 200
    gen = generate(
        model, ids, mask, Sampling(6, temperature=1.0), [0, 1, 2], eos_ids=[], pad_id=0, vocab=vocab, top_k=k
    )
    plain = generate(model, ids, mask, Sampling(6, temperature=1.0), [0, 1, 2], eos_ids=[], pad_id=0, vocab=vocab)
    assert torch.equal(gen.input_ids, plain.input_ids)  # keeping the top-k draws nothing
    with torch.no_grad():  # the teacher-forced forward over the left-aligned rows, as training runs it
        logp = F.log_softmax(model(input_ids=gen.input_ids, attention_mask=gen.mask.long()).logits[..., :vocab], -1)
    scored = gen.scored()
    want = logp.topk(k, dim=-1)
    assert gen.top.ids.shape == (*gen.input_ids.shape, k)
    assert torch.equal(gen.top.ids[scored].long(), want.indices[scored])
    torch.testing.assert_close(gen.top.logprobs[scored], want.values[scored], atol=1e-5, rtol=1e-5)
    rest = logp.scatter(-1, want.indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(gen.top.tail[scored], rest[scored], atol=1e-5, rtol=1e-5)
    # every sampled token is among its position's kept tokens or in the tail; unscored positions hold a finite stand-in
    assert torch.isfinite(gen.top.logprobs).all() and (gen.top.tail[~scored] == float("-inf")).all()


def test_a_sequence_level_run_on_the_kept_top_k_equals_the_run_on_the_live_teacher(
    teacher, corpus, tmp_path, monkeypatch
):
    """With k covering the whole vocabulary, the kept log-probabilities are the teacher's distribution: the run that
    reads them, without a second teacher forward, trains exactly as the run that runs the teacher on its samples."""
    import alignkd.teacher.teacher as live

    forwards = []
    real = live.forward_record
    monkeypatch.setattr(live, "forward_record", lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    alignkd.distill(_sequence_cfg(teacher, corpus, tmp_path / "live", samples=str(tmp_path / "s")))
    assert forwards  # the teacher scored its samples
    forwards.clear()
    cfg = _sequence_cfg(teacher, corpus, tmp_path / "kept", samples=str(tmp_path / "s"), teacher_top_k=vocab)
    alignkd.distill(cfg)
    assert not forwards  # ... and here it did not
    live_rows, kept_rows = (
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("live", "kept")
    )
    train = [(a, b) for a, b in zip(live_rows, kept_rows, strict=True) if a["split"] == "train"]
    assert len(train) == 3
    for a, b in train:
        for key in ("loss", "loss/kl", "loss/ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    # The top-k store is its own (keyed by k), and a later run reuses it.
    assert len(list((tmp_path / "s").iterdir())) == 2
    cfg["train"]["output_dir"] = str(tmp_path / "again")
    alignkd.distill(cfg)
    again = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if r["split"] == "train"] == [b["loss"] for _, b in train]


def test_kept_top_k_needs_a_teacher_source_and_terms_that_read_it(teacher, corpus, tmp_path):
    cfg = _sequence_cfg(teacher, corpus, tmp_path / "a", teacher_top_k=8)
    cfg["losses"] = [{"type": "kl"}, {"type": "hidden"}]
    with pytest.raises(ConfigError, match=r"losses\[1\]: the hidden term needs the live teacher on its samples"):
        alignkd.distill(cfg)
    cfg = _sequence_cfg(teacher, corpus, tmp_path / "b", teacher_top_k=8)
    cfg["generation"]["sources"] = {"dataset": 0.5, "student": 0.5}
    with pytest.raises(ConfigError, match="generation.teacher_top_k: keeps the teacher's top-k with its samples"):
        alignkd.distill(cfg)


def test_an_on_policy_run_logs_sampling_apart_from_training(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl", "kind": "reverse"}], steps=4)
    cfg["generation"] = {"sources": {"dataset": 0.5, "student": 0.5}, "prompt_tokens": 4, "max_new_tokens": 6}
    alignkd.distill(copy.deepcopy(cfg))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {r["sources"] for r in train} == {"dataset", "student"}  # seed 0's draws over 4 steps
    for r in train:
        on = r["sources"] == "student"
        assert (r["generated_tokens"] > 0) == on and (r["gen_s"] > 0) == on
        assert 0 <= r["gen_share"] < 1 and ("generated_tokens_per_s" in r) == on


def test_generated_batches_with_prompts_from_a_file(teacher, corpus, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["It is", "However little", "a"]))
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}], steps=2)
    cfg["generation"] = {"sources": {"student": 1.0}, "prompts": str(prompts), "max_new_tokens": 5}
    run = make_run(cfg)
    assert [p.tolist() for p in run.sources.prompts] == [
        run.tokenizer(t)["input_ids"] for t in ["It is", "However little", "a"]
    ]
    b = run.sources.draw(run, 0, 0, seed=0).batch
    for i in range(b.input_ids.shape[0]):
        first = int(b.scored[i].nonzero()[0])  # the prompt's last position predicts the first sampled token
        prompt = b.input_ids[i, : first + 1].tolist()
        assert prompt in [p.tolist() for p in run.sources.prompts]


# ----------------------------------------------------------------------------- judging generation


def test_token_rouge_l_matches_rouge_score_on_the_ids_as_words():
    from rouge_score import rouge_scorer

    from alignkd.engine.judge import rouge_l

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        a = torch.randint(0, 6, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        b = torch.randint(0, 6, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        want = scorer.score(" ".join(f"t{x}" for x in b), " ".join(f"t{x}" for x in a))["rougeL"].fmeasure
        assert rouge_l(a, b) == pytest.approx(want, abs=1e-12)
    assert rouge_l([], [1, 2]) == 0.0 and rouge_l([1, 2], [1, 2]) == 1.0


def test_distinct_2_counts_repeats_once():
    from alignkd.engine.judge import distinct_n

    assert distinct_n([[1, 2, 1, 2, 1]]) == pytest.approx(2 / 4)  # bigrams 12 21 12 21: two distinct
    assert distinct_n([[1, 2], [1, 2], [3, 4]]) == pytest.approx(2 / 3)
    assert distinct_n([[5], []]) != distinct_n([[5], []])  # no bigram at all: NaN, not 0 or 1


def test_teacher_nll_is_the_mean_nll_of_the_sampled_tokens_alone():
    from alignkd.engine.judge import teacher_nll

    model = tiny.build("llama")
    gen = join([torch.tensor([4, 5, 6]), torch.tensor([7])], [torch.tensor([8, 1]), torch.tensor([9, 10, 11])], 0)
    total, n = teacher_nll(model, gen, vocab=tiny.VOCAB)
    want = 0.0
    for row, (p, c) in enumerate([(3, 2), (1, 3)]):
        ids = gen.input_ids[row, : p + c]
        with torch.no_grad():
            logp = model(input_ids=ids[None]).logits[0].log_softmax(-1)
        want -= sum(float(logp[p - 1 + j, ids[p + j]]) for j in range(c))
    assert n == 5 and total == pytest.approx(want, rel=1e-5)


def test_a_run_with_eval_prompts_logs_the_generation_metrics_at_the_end(teacher, corpus, tmp_path):
    cfg = make_cfg(teacher, corpus, tmp_path / "run", losses=[{"type": "kl"}], steps=2, eval_every=1)
    cfg["generation"] = {"eval_prompts": 3, "prompt_tokens": 4, "max_new_tokens": 5}  # data only: the baseline
    alignkd.distill(cfg)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert [("gen_rougeL" in r) for r in evals] == [False, True]  # only the last evaluation generates
    last = evals[-1]
    assert 0 <= last["gen_rougeL"] <= 1 and 0 < last["gen_distinct2"] <= 1 and last["gen_teacher_nll"] > 0
