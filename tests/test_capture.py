"""Tests of alignkd.models.capture (hooks) and alignkd.align.plan (what each model must expose).

Captured tensors are compared with what transformers itself returns
(``output_hidden_states`` / ``output_attentions``) or with the projections
recomputed by hand from a block's input, never with another hook of ours.
"""

from __future__ import annotations

import pytest
import torch

from alignkd import testing as tiny
from alignkd.align.maps import AdaptiveMix, Projector
from alignkd.align.plan import StudentSide, build_plan
from alignkd.config import ConfigError, load_config
from alignkd.models.capture import Capture, Needs
from alignkd.models.families import FAMILIES, blocks_of, get_path

DECODERS = ["llama", "qwen2", "gemma3", "gpt2"]
LAYERS = 3


@pytest.fixture(scope="module")
def models():
    """Eager-attention models of each family, 3 blocks, width 32."""
    out = {f: tiny.build(f, layers=LAYERS, attn_implementation="eager") for f in DECODERS}
    out["bert"] = tiny.build("bert", task="sequence_classification", layers=LAYERS, attn_implementation="eager")
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(5, 261, (2, 9), generator=torch.Generator().manual_seed(0))


def reference(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, output_attentions=True)


def run(model, needs, ids):
    cap = Capture(model, needs)
    try:
        with torch.no_grad():
            model(input_ids=ids)
        return cap.take()
    finally:
        cap.remove()


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- hidden states


@pytest.mark.parametrize("family", DECODERS + ["bert"])
def test_records_exactly_the_requested_blocks(models, ids, family):
    rec = run(models[family], Needs(hidden={0, 2}), ids)
    assert set(rec.hidden) == {0, 2}
    assert rec.attention == {} and rec.qkv == {} and rec.logits is None
    assert rec.hidden[0].shape == (2, 9, 32)


@pytest.mark.parametrize("family", DECODERS + ["bert"])
def test_intermediate_block_outputs_equal_output_hidden_states(models, ids, family):
    model = models[family]
    ref = reference(model, ids).hidden_states
    assert len(ref) == LAYERS + 1
    rec = run(model, Needs(hidden=set(range(LAYERS - 1))), ids)
    for i in range(LAYERS - 1):
        torch.testing.assert_close(rec.hidden[i], ref[i + 1], rtol=0, atol=0, msg=f"block {i}")


@pytest.mark.parametrize("family", DECODERS)
def test_last_block_output_is_before_the_final_norm(models, ids, family):
    model = models[family]
    norm = get_path(model.base_model, FAMILIES[model.config.model_type].final_norm)
    seen = {}
    handle = norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("pre_norm", args[0]))
    try:
        rec = run(model, Needs(hidden={LAYERS - 1}), ids)
    finally:
        handle.remove()
    last = rec.hidden[LAYERS - 1]
    torch.testing.assert_close(last, seen["pre_norm"], rtol=0, atol=0)
    # transformers reports the normed state as the last hidden state.
    ref = reference(model, ids).hidden_states[-1]
    with torch.no_grad():
        torch.testing.assert_close(norm(last), ref)
    assert not torch.allclose(last, ref)


def test_bert_last_block_equals_the_last_hidden_state(models, ids):
    model = models["bert"]
    rec = run(model, Needs(hidden={LAYERS - 1}), ids)
    torch.testing.assert_close(rec.hidden[LAYERS - 1], reference(model, ids).hidden_states[-1], rtol=0, atol=0)


def test_record_keeps_the_graph_for_training():
    model = tiny.build("llama", layers=2)
    cap = Capture(model, Needs(hidden={0}))
    model(input_ids=torch.tensor([[5, 6, 7]]))
    h = cap.take().hidden[0]
    assert h.requires_grad
    h.sum().backward()
    assert blocks_of(model)[0].mlp.down_proj.weight.grad is not None


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("family", DECODERS + ["bert"])
def test_attention_probabilities_equal_output_attentions(models, ids, family):
    model = models[family]
    ref = reference(model, ids).attentions
    rec = run(model, Needs(attention={0, 2}), ids)
    assert set(rec.attention) == {0, 2} and rec.hidden == {}
    for i in (0, 2):
        a = rec.attention[i]
        assert a.shape == (2, 4, 9, 9)
        torch.testing.assert_close(a, ref[i], rtol=0, atol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 9))
    if family != "bert":
        assert rec.attention[0][0, 0].triu(1).abs().max() == 0, "causal attention looks ahead"


def test_attention_from_an_sdpa_model_is_a_clear_error(ids):
    model = tiny.build("llama", layers=2)  # sdpa by default
    assert model.config._attn_implementation != "eager"
    cap = Capture(model, Needs(attention={1}))
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"), torch.no_grad():
        model(input_ids=ids)
    cap.remove()


# ---------------------------------------------------------------- q / k / v


def _block_input(model, ids, block: int) -> torch.Tensor:
    return reference(model, ids).hidden_states[block]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "bert"])
def test_qkv_equal_the_projection_outputs(models, ids, family):
    model = models[family]
    block = blocks_of(model)[1]
    fam = FAMILIES[model.config.model_type]
    x = _block_input(model, ids, 1)
    pre = block.input_layernorm if family != "bert" else torch.nn.Identity()
    with torch.no_grad():
        expected = {p: get_path(block, fam.qkv[j])(pre(x)) for j, p in enumerate("qkv")}
    rec = run(model, Needs(qkv={(1, "q"), (1, "k"), (1, "v")}), ids)
    assert set(rec.qkv) == {(1, "q"), (1, "k"), (1, "v")}
    for p in "qkv":
        torch.testing.assert_close(rec.qkv[(1, p)], expected[p], msg=p)
    if family != "bert":  # grouped-query attention: k and v are narrower than q
        assert rec.qkv[(1, "k")].shape[-1] == rec.qkv[(1, "q")].shape[-1] // 2


def test_gpt2_fused_projection_is_split_in_three(models, ids):
    model = models["gpt2"]
    block = blocks_of(model)[2]
    x = _block_input(model, ids, 2)
    with torch.no_grad():
        fused = block.ln_1(x) @ block.attn.c_attn.weight + block.attn.c_attn.bias
    q, k, v = fused[..., :32], fused[..., 32:64], fused[..., 64:]
    rec = run(model, Needs(qkv={(2, "q"), (2, "v")}), ids)
    assert set(rec.qkv) == {(2, "q"), (2, "v")}, "only the asked parts"
    torch.testing.assert_close(rec.qkv[(2, "q")], q)
    torch.testing.assert_close(rec.qkv[(2, "v")], v)
    assert not torch.allclose(rec.qkv[(2, "q")], k)


def test_needs_of_different_kinds_together(models, ids):
    model = models["llama"]
    rec = run(model, Needs(hidden={1}, attention={1}, qkv={(0, "k")}), ids)
    assert set(rec.hidden) == {1} and set(rec.attention) == {1} and set(rec.qkv) == {(0, "k")}


# ---------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("needs", [Needs(hidden={3}), Needs(hidden={-1}), Needs(attention={7}), Needs(qkv={(3, "q")})])
def test_block_out_of_range_raises(models, needs):
    with pytest.raises(IndexError, match=r"the model has 3 blocks \(0\.\.2\)"):
        Capture(models["llama"], needs)


def test_failed_capture_leaves_no_hooks(models):
    model = models["llama"]
    before = hook_count(model)
    with pytest.raises(IndexError):
        Capture(model, Needs(hidden={0, 5}))
    assert hook_count(model) == before


def test_paused_records_nothing(models, ids):
    model = models["gpt2"]
    cap = Capture(model, Needs(hidden={0}, attention={1}, qkv={(1, "k")}))
    try:
        with torch.no_grad(), cap.paused():
            model(input_ids=ids)
        rec = cap.take()
        assert rec.hidden == {} and rec.attention == {} and rec.qkv == {}
        assert cap.active
        with torch.no_grad():
            model(input_ids=ids)
        rec = cap.take()
        assert set(rec.hidden) == {0} and set(rec.attention) == {1} and set(rec.qkv) == {(1, "k")}
    finally:
        cap.remove()


def test_paused_restores_recording_after_an_error(models):
    cap = Capture(models["llama"], Needs(hidden={0}))
    with pytest.raises(ValueError), cap.paused():
        raise ValueError("boom")
    assert cap.active
    cap.remove()


def test_take_starts_a_fresh_record(models, ids):
    model = models["llama"]
    cap = Capture(model, Needs(hidden={0}))
    with torch.no_grad():
        model(input_ids=ids)
    first = cap.take()
    assert set(first.hidden) == {0}
    assert cap.take().hidden == {}
    cap.remove()


def test_remove_detaches_hooks(models, ids):
    model = models["qwen2"]
    before = hook_count(model)
    cap = Capture(model, Needs(hidden={0, 1}, attention={2}, qkv={(0, "q"), (0, "v")}))
    assert hook_count(model) == before + 5 == before + len(cap.handles)
    cap.remove()
    assert hook_count(model) == before and cap.handles == []
    with torch.no_grad():
        model(input_ids=ids)
    rec = cap.take()
    assert rec.hidden == {} and rec.attention == {} and rec.qkv == {}


def test_empty_needs_register_nothing(models):
    model = models["llama"]
    before = hook_count(model)
    cap = Capture(model, Needs())
    assert cap.handles == [] and hook_count(model) == before


# ---------------------------------------------------------------- plan


def losses(*terms):
    data = {"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": "d"}, "losses": list(terms)}
    return load_config(data=data).losses


@pytest.fixture(scope="module")
def pair_models():
    """A student (2 blocks, width 32), a wide teacher (4 blocks, width 64), a same-width teacher (4 blocks, 32)."""
    return {
        "student": tiny.build("llama", layers=2, width=32, heads=4),
        "wide": tiny.build("llama", layers=4, width=64, heads=4),
        "same": tiny.build("llama", layers=4, width=32, heads=4),
    }


def test_projectors_exist_exactly_when_widths_differ(pair_models):
    terms = losses(
        {"type": "kl"},
        {"type": "ce"},
        {"type": "hidden"},
        {"type": "contrastive"},
        {"type": "blockwise", "layers": [[0, 2]]},
        {"type": "attention"},
        {"type": "relation"},
    )
    s = pair_models["student"]
    plan = build_plan(terms, s, pair_models["wide"])
    assert set(plan.projectors) == {"hidden__0", "hidden__1", "contrastive__1", "blockwise__0"}
    for p in plan.projectors.values():
        assert isinstance(p, Projector) and p.linear.weight.shape == (64, 32)
        assert isinstance(p.norm, torch.nn.Identity)
    assert plan.mixes == {}

    same = build_plan(terms, s, pair_models["same"])
    assert same.projectors == {} and same.mixes == {}


def test_linear_norm_projector(pair_models):
    plan = build_plan(
        losses({"type": "hidden", "projector": "linear_norm", "layers": "last"}),
        pair_models["student"],
        pair_models["wide"],
    )
    (p,) = plan.projectors.values()
    assert isinstance(p.norm, torch.nn.LayerNorm) and p.norm.normalized_shape == (64,)


def test_projector_none_needs_equal_widths(pair_models):
    terms = losses(
        {"type": "hidden", "projector": "none"}, {"type": "blockwise", "layers": [[0, 2]], "projector": "none"}
    )
    assert build_plan(terms, pair_models["student"], pair_models["same"]).projectors == {}
    with pytest.raises(
        ConfigError, match=r"losses\[0\]\.projector: none, but the student is 32 wide and the teacher 64"
    ):
        build_plan(terms, pair_models["student"], pair_models["wide"])


def test_named_terms_key_their_projectors(pair_models):
    plan = build_plan(
        losses({"type": "hidden", "name": "feat.a", "layers": [[1, 3]]}), pair_models["student"], pair_models["wide"]
    )
    assert set(plan.projectors) == {"feat_a__1"}
    side = StudentSide(pair_models["student"], plan.student_needs, plan.projectors, plan.mixes)
    try:
        assert side.projector("feat.a", 1) is plan.projectors["feat_a__1"]
        assert side.projector("feat.a", 0) is None
    finally:
        side.capture.remove()


def test_teacher_needs_only_mapped_blocks(pair_models):
    teacher = pair_models["wide"]
    plan = build_plan(losses({"type": "hidden", "layers": [[0, 1], [1, 3]]}), pair_models["student"], teacher)
    assert plan.student_needs.hidden == {0, 1}
    assert plan.teacher_needs.hidden == {1, 3}
    assert plan.teacher_needs.attention == set() and plan.teacher_needs.qkv == set()
    assert not plan.needs_eager_attention
    assert plan.terms[0].pairs == [(0, 1), (1, 3)]
    before = hook_count(teacher)
    cap = Capture(teacher, plan.teacher_needs)
    assert len(cap.handles) == 2 and hook_count(teacher) == before + 2
    cap.remove()


def test_output_terms_need_nothing(pair_models):
    plan = build_plan(
        losses({"type": "kl"}, {"type": "ce"}, {"type": "dkd"}), pair_models["student"], pair_models["wide"]
    )
    for needs in (plan.student_needs, plan.teacher_needs):
        assert needs.hidden == set() and needs.attention == set() and needs.qkv == set()
    assert [t.pairs for t in plan.terms] == [[], [], []]
    assert [getattr(t.cfg, "temperature", None) for t in plan.terms] == [1.0, None, 4.0]
    assert plan.projectors == {} and not plan.needs_eager_attention


def test_adaptive_mixture_needs_every_teacher_block(pair_models):
    plan = build_plan(losses({"type": "hidden", "layers": "adaptive"}), pair_models["student"], pair_models["wide"])
    (mix,) = plan.mixes.values()
    assert set(plan.mixes) == {"hidden"}
    assert isinstance(mix, AdaptiveMix) and mix.logits.shape == (2, 4)
    assert mix.weights().argmax(-1).tolist() == [1, 3]  # centred on the auto map
    assert plan.teacher_needs.hidden == {0, 1, 2, 3}
    assert plan.student_needs.hidden == {0, 1}
    assert set(plan.projectors) == {"hidden__0", "hidden__1"}


def test_blockwise_needs_only_the_student_state(pair_models):
    plan = build_plan(losses({"type": "blockwise", "layers": [[1, 2]]}), pair_models["student"], pair_models["wide"])
    assert plan.student_needs.hidden == {1}
    assert plan.teacher_needs.hidden == set()


def test_attention_terms_ask_for_eager_attention(pair_models):
    plan = build_plan(
        losses({"type": "attention", "layers": [[0, 1], [1, 3]]}), pair_models["student"], pair_models["wide"]
    )
    assert plan.needs_eager_attention
    assert plan.student_needs.attention == {0, 1} and plan.teacher_needs.attention == {1, 3}
    assert plan.student_needs.hidden == set() and plan.teacher_needs.hidden == set()


def test_relation_needs_qkv_of_the_mapped_blocks(pair_models):
    plan = build_plan(losses({"type": "relation", "of": ["q", "v"]}), pair_models["student"], pair_models["wide"])
    assert plan.student_needs.qkv == {(1, "q"), (1, "v")}
    assert plan.teacher_needs.qkv == {(3, "q"), (3, "v")}
    assert not plan.needs_eager_attention and plan.projectors == {}


def _qkv_widths(model, parts="qkv"):
    fam = FAMILIES[model.config.model_type]
    block = blocks_of(model)[0]
    if isinstance(fam.qkv, str):
        return [get_path(block, fam.qkv).weight.shape[-1] // 3 for _ in parts]
    return [get_path(block, fam.qkv["qkv".index(p)]).weight.shape[0] for p in parts]


@pytest.mark.parametrize(
    ("family", "s_kw", "t_kw", "expected"),
    [
        ("llama", dict(width=48, heads=6), dict(width=64, heads=4), 4),  # q 48, k/v 24 | q 64, k/v 32
        ("llama", dict(width=32, heads=4), dict(width=64, heads=8), 4),
        ("llama", dict(width=40, heads=5), dict(width=64, heads=4), 4),  # 40, 16 (kv 2 x 8) | 64, 32
        ("llama", dict(width=36, heads=6), dict(width=64, heads=4), 2),  # 36, 18 (kv 3 x 6) | 64, 32
        ("gpt2", dict(width=48, heads=6), dict(width=64, heads=4), 4),
        ("gpt2", dict(width=36, heads=6), dict(width=64, heads=4), 4),
    ],
)
def test_relation_heads_default_divides_every_width(family, s_kw, t_kw, expected):
    student = tiny.build(family, layers=2, **s_kw)
    teacher = tiny.build(family, layers=2, **t_kw)
    plan = build_plan(losses({"type": "relation"}), student, teacher)
    h = plan.terms[0].params["heads"]
    widths = _qkv_widths(student) + _qkv_widths(teacher)
    assert all(w % h == 0 for w in widths), (h, widths)
    best = max(c for c in range(1, s_kw["heads"] + 1) if all(w % c == 0 for w in widths))
    assert h == best == expected


def test_relation_heads_explicit(pair_models):
    plan = build_plan(
        losses({"type": "relation", "num_relation_heads": 8}), pair_models["student"], pair_models["wide"]
    )
    assert plan.terms[0].params["heads"] == 8
    with pytest.raises(ConfigError, match=r"losses\[0\]\.num_relation_heads: 3 does not divide"):
        build_plan(losses({"type": "relation", "num_relation_heads": 3}), pair_models["student"], pair_models["wide"])


@pytest.mark.parametrize(("layers", "side"), [([[2, 0]], "student layer 2"), ([[0, 4]], "teacher layer 4")])
def test_plan_layer_out_of_range_is_a_config_error(pair_models, layers, side):
    with pytest.raises(ConfigError) as info:
        build_plan(
            losses({"type": "kl"}, {"type": "hidden", "layers": layers}), pair_models["student"], pair_models["wide"]
        )
    msg = str(info.value)
    assert msg.startswith("losses[1].layers") and side in msg


def test_student_side_forward_and_aux_state(pair_models, ids):
    student = tiny.build("llama", layers=2, width=32)
    plan = build_plan(losses({"type": "hidden", "layers": "adaptive"}, {"type": "kl"}), student, pair_models["wide"])
    side = StudentSide(student, plan.student_needs, plan.projectors, plan.mixes)
    try:
        rec = side(ids, torch.ones_like(ids, dtype=torch.bool))
        assert rec.logits.shape == (2, 9, tiny.VOCAB) and set(rec.hidden) == {0, 1}
        assert side.mix("hidden") is plan.mixes["hidden"] and side.mix("kl") is None
        aux = side.aux_state()
        assert aux and not any(k.startswith("student.") for k in aux)
        assert set(aux) == {
            "projectors.hidden__0.linear.weight",
            "projectors.hidden__1.linear.weight",
            "mixes.hidden.logits",
        }
    finally:
        side.capture.remove()
