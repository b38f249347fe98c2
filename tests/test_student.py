"""Tests of alignkd.models.student (and the vocabulary checks of alignkd.models.loading).

Depth pruning must copy exactly the chosen blocks and everything around them,
renumber what carries a layer index, and leave a model that saves and loads
back to the same logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkd import testing as tiny
from alignkd.config import FromTeacherConfig, StudentConfig
from alignkd.models import ModelError, check_tokenizers, common_vocab
from alignkd.models.depth import even_layers
from alignkd.models.families import FAMILIES, blocks_of, get_path
from alignkd.models.student import build_student, depth_pruned, freeze, from_config, kept_count

FAMILY_NAMES = ["llama", "qwen2", "gemma3", "gpt2"]
# Mixed layer types, so a wrong layer_types after pruning changes the masks.
LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
KEEP = [0, 1, 3]
SEQ = 24  # longer than the sliding window (16) of the tiny qwen2 / gemma3 configs


def make_teacher(family: str, **kw):
    if family == "qwen2":
        kw.update(use_sliding_window=True, sliding_window=16, layer_types=LAYER_TYPES)
    if family == "gemma3":
        kw.update(layer_types=LAYER_TYPES)
    return tiny.build(family, layers=4, width=32, heads=4, **kw)


@pytest.fixture(scope="module")
def teachers():
    return {f: make_teacher(f) for f in FAMILY_NAMES}


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, 261, (2, SEQ), generator=g)


def final_norm(model):
    path = FAMILIES[model.config.model_type].final_norm
    return get_path(model.base_model, path)


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


# ---------------------------------------------------------------- even_layers


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (30, 6, [0, 6, 12, 17, 23, 29]),
        (12, 4, [0, 4, 7, 11]),
        (4, 2, [0, 3]),
        (5, 5, [0, 1, 2, 3, 4]),
        (7, 1, [0]),
        (2, 2, [0, 1]),
    ],
)
def test_even_layers(n, k, expected):
    assert even_layers(n, k) == expected


@pytest.mark.parametrize("n", [2, 3, 12, 30])
def test_even_layers_keeps_first_and_last_and_no_repeats(n):
    for k in range(2, n + 1):
        got = even_layers(n, k)
        assert len(got) == k and got[0] == 0 and got[-1] == n - 1
        assert got == sorted(set(got))


@pytest.mark.parametrize("k", [0, -1, 5])
def test_even_layers_rejects_impossible_counts(k):
    with pytest.raises(ModelError, match=r"num_layers: must be between 1 and 4"):
        even_layers(4, k)


# ---------------------------------------------------------------- depth pruning


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_depth_pruned_copies_the_chosen_blocks(teachers, family):
    teacher = teachers[family]
    student = depth_pruned(teacher, KEEP, None)
    s_blocks, t_blocks = blocks_of(student), blocks_of(teacher)
    assert len(s_blocks) == len(KEEP)
    for j, i in enumerate(KEEP):
        assert_same_tensors(s_blocks[j], t_blocks[i], f"student block {j} vs teacher block {i}")
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    assert_same_tensors(final_norm(student), final_norm(teacher), "final norm")
    if family == "gpt2":
        assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight)
    # Every student tensor is one of the teacher's (nothing new, nothing random).
    teacher_values = list(teacher.state_dict().values())
    for k, v in student.state_dict().items():
        assert any(v.shape == t.shape and torch.equal(v, t) for t in teacher_values), k


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_depth_pruned_is_a_copy(teachers, family):
    teacher = teachers[family]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = depth_pruned(teacher, KEEP, None)
    t_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in t_ptrs for p in student.parameters()), "student shares storage with the teacher"
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert len(blocks_of(teacher)) == 4 and teacher.config.num_hidden_layers == 4
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_depth_pruned_renumbers_and_updates_the_config(teachers, family):
    teacher = teachers[family]
    student = depth_pruned(teacher, KEEP, None)
    assert student.config.num_hidden_layers == len(KEEP)
    assert teacher.config.num_hidden_layers == 4
    for j, block in enumerate(blocks_of(student)):
        idx = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idx == {j}, f"block {j} carries layer_idx {idx}"
    if family in ("qwen2", "gemma3"):
        assert student.config.layer_types == [LAYER_TYPES[i] for i in KEEP]
        assert teacher.config.layer_types == LAYER_TYPES
        for j, block in enumerate(blocks_of(student)):
            if hasattr(block, "attention_type"):
                assert block.attention_type == student.config.layer_types[j]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_depth_pruned_runs_and_round_trips(teachers, family, ids, tmp_path):
    student = depth_pruned(teachers[family], KEEP, None).eval()
    with torch.no_grad():
        out = student(input_ids=ids, output_hidden_states=True)
    assert out.logits.shape == (2, SEQ, tiny.VOCAB)
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == len(KEEP) + 1

    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    assert len(blocks_of(loaded)) == len(KEEP)
    assert_same_tensors(loaded, student, "reloaded student")
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    torch.testing.assert_close(again, out.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keeping_every_block_gives_the_teacher(teachers, family, ids):
    teacher = teachers[family]
    student = depth_pruned(teacher, list(range(4)), None).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_dropping_a_block_changes_the_output(teachers, ids):
    # The pruned model really runs without the dropped block (not the teacher's list).
    teacher = teachers["llama"]
    student = depth_pruned(teacher, [0, 1, 2], None).eval()
    with torch.no_grad():
        s = student(input_ids=ids, output_hidden_states=True).hidden_states
        t = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(s[1], t[1])
    torch.testing.assert_close(s[2], t[2])
    assert not torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_depth_pruned_picks_even_blocks_when_only_a_count_is_given(teachers):
    teacher = teachers["llama"]
    two = depth_pruned(teacher, None, 2)
    assert len(blocks_of(two)) == 2
    assert_same_tensors(blocks_of(two)[1], blocks_of(teacher)[3], "last kept block")
    default = depth_pruned(teacher, None, None)  # a quarter of 4 blocks
    assert len(blocks_of(default)) == 1
    assert_same_tensors(blocks_of(default)[0], blocks_of(teacher)[0], "first block")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_depth_pruned_view_shares_the_teachers_tensors(teachers, family, ids):
    # The view that scoring a removal runs: same weights, its own modules and config.
    teacher = teachers[family]
    view = depth_pruned(teacher, KEEP, None, share_weights=True).eval()
    for j, i in enumerate(KEEP):
        for (name, p), q in zip(blocks_of(view)[j].named_parameters(), blocks_of(teacher)[i].parameters(), strict=True):
            assert p is q, f"block {j} {name} is a copy"
    assert view.get_input_embeddings().weight is teacher.get_input_embeddings().weight
    assert len(blocks_of(teacher)) == 4 and teacher.config.num_hidden_layers == 4 and view.config.num_hidden_layers == 3
    copied = depth_pruned(teacher, KEEP, None).eval()
    with torch.no_grad():
        torch.testing.assert_close(view(input_ids=ids).logits, copied(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("n", "num_layers", "expected"), [(30, None, 7), (3, None, 1), (4, None, 1), (30, 6, 6)])
def test_kept_count(n, num_layers, expected):
    assert kept_count(n, num_layers) == expected


@pytest.mark.parametrize("layers", [[0, 4], [-1], [7]])
def test_depth_pruned_out_of_range_is_one_line(teachers, layers):
    with pytest.raises(ModelError) as info:
        depth_pruned(teachers["llama"], layers, None)
    msg = str(info.value)
    assert "\n" not in msg
    bad = [i for i in layers if not 0 <= i < 4][0]
    assert f"block {bad} does not exist" in msg and "4 blocks (0..3)" in msg


def test_depth_pruned_needs_a_block(teachers):
    with pytest.raises(ModelError, match="at least one"):
        depth_pruned(teachers["llama"], [], None)


def test_depth_pruned_repeated_block_is_not_tied(teachers):
    # Keeping a block twice must give two independent blocks (or be refused):
    # one shared module would train as tied weights and both copies would claim
    # the same KV-cache slot.
    try:
        student = depth_pruned(teachers["llama"], [1, 1], None)
    except ModelError:
        return
    a, b = blocks_of(student)
    assert id(a) != id(b), "the two kept copies are one shared module"
    assert a.self_attn.layer_idx == 0 and b.self_attn.layer_idx == 1


# ---------------------------------------------------------------- from_config


def test_from_config_applies_overrides_to_the_teacher_architecture(teachers):
    teacher = teachers["llama"]
    student = from_config(teacher, {"num_hidden_layers": 2, "intermediate_size": 40}, "causal_lm")
    assert type(student) is type(teacher)
    c, t = student.config, teacher.config
    assert c.num_hidden_layers == 2 and len(blocks_of(student)) == 2
    assert c.intermediate_size == 40 and blocks_of(student)[0].mlp.up_proj.weight.shape == (40, 32)
    for key in (
        "hidden_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
    ):
        assert getattr(c, key, None) == getattr(t, key, None), key
    # Fresh weights, not the teacher's.
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_from_config_recomputes_head_dim(teachers, family):
    teacher = teachers[family]  # width 32, 4 heads: head_dim 8
    student = from_config(teacher, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}, "causal_lm")
    attn = blocks_of(student)[0].self_attn
    assert attn.head_dim == 16 and getattr(student.config, "head_dim", 16) == 16
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == (32, 64)
    fewer_heads = from_config(teacher, {"num_attention_heads": 2, "num_key_value_heads": 1}, "causal_lm")
    assert blocks_of(fewer_heads)[0].self_attn.head_dim == 16
    assert blocks_of(fewer_heads)[0].self_attn.k_proj.weight.shape == (16, 32)
    with torch.no_grad():
        assert student(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, tiny.VOCAB)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_from_config_rebuilds_layer_types_for_a_new_depth(teachers, family):
    student = from_config(teachers[family], {"num_hidden_layers": 2}, "causal_lm")
    assert len(student.config.layer_types) == 2
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_from_config_gpt2(teachers):
    student = from_config(teachers["gpt2"], {"n_layer": 1, "n_embd": 48, "n_head": 4}, "causal_lm")
    assert student.config.n_layer == 1 and student.config.n_embd == 48
    assert len(blocks_of(student)) == 1 and student.get_input_embeddings().weight.shape == (tiny.VOCAB, 48)


def test_from_config_unknown_key_suggests(teachers):
    with pytest.raises(ModelError) as info:
        from_config(teachers["llama"], {"num_hiden_layers": 2}, "causal_lm")
    msg = str(info.value)
    assert "student.config.num_hiden_layers" in msg and "did you mean 'num_hidden_layers'" in msg


# ---------------------------------------------------------------- build_student / freeze


def test_freeze():
    teacher = tiny.build("llama")
    teacher.train()
    assert any(p.requires_grad for p in teacher.parameters())
    out = freeze(teacher)
    assert out is teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())


def test_student_from_a_frozen_teacher_is_trainable():
    teacher = freeze(tiny.build("llama", layers=4))
    student = build_student(StudentConfig(from_teacher=FromTeacherConfig(layers=[0, 3])), teacher, "causal_lm")
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    student2 = build_student(StudentConfig(config={"num_hidden_layers": 1}), teacher, "causal_lm")
    assert len(blocks_of(student2)) == 1 and student2.training


def test_student_dtype():
    teacher = freeze(tiny.build("llama", layers=2))
    student = build_student(
        StudentConfig(from_teacher=FromTeacherConfig(num_layers=1), dtype="bfloat16"), teacher, "causal_lm"
    )
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}


# ---------------------------------------------------------------- vocabularies


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.byte_tokenizer()


def test_common_vocab_with_padded_heads(tokenizer):
    assert len(tokenizer) == 261
    teacher = tiny.build("llama", vocab=272)
    student = tiny.build("llama", vocab=280)
    assert common_vocab(teacher, student, tokenizer) == 272
    assert common_vocab(student, teacher, tokenizer) == 272
    assert common_vocab(teacher, teacher, tokenizer) == 272


def test_common_vocab_head_smaller_than_the_tokenizer(tokenizer):
    teacher = tiny.build("llama", vocab=272)
    student = tiny.build("llama", vocab=250)
    with pytest.raises(ModelError) as info:
        common_vocab(teacher, student, tokenizer)
    msg = str(info.value)
    assert "250" in msg and "261" in msg and "\n" not in msg


def test_common_vocab_gpt2_tied_head(tokenizer):
    assert common_vocab(tiny.build("gpt2", vocab=264), tiny.build("llama", vocab=300), tokenizer) == 264


def test_check_tokenizers(tokenizer):
    check_tokenizers(tokenizer, tiny.byte_tokenizer())
    check_tokenizers(tokenizer, None)
    other = tiny.byte_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ModelError) as info:
        check_tokenizers(tokenizer, other)
    msg = str(info.value)
    assert "261 vs 262" in msg and "shared tokenizer" in msg


@pytest.mark.parametrize("tied", [True, False])
def test_a_teacher_counts_the_same_live_on_the_meta_device_and_in_a_run_without_its_weights(tmp_path, tied):
    """A run that reads a teacher cache keeps the teacher on the meta device; its size must not change there
    (``Module.to("meta")`` unties a tied head, which then counted twice)."""
    from test_engine import make_cfg

    from alignkd.config import load_config
    from alignkd.engine.load import load_models
    from alignkd.evaluate import param_counts
    from alignkd.models import load_model
    from alignkd.models.loading import load_skeleton
    from alignkd.models.student import param_count, to_meta

    path = tiny.save_model(tmp_path / "t", "llama", layers=2, width=32, tie_word_embeddings=tied)
    live = load_model(str(path), task="causal_lm", dtype="float32")
    emb = live.get_input_embeddings().weight
    assert (live.get_output_embeddings().weight is emb) == tied
    want = sum(p.numel() for p in live.state_dict().values()) - (emb.numel() if tied else 0)
    assert param_count(live) == param_counts(live)["params"] == want
    assert param_count(load_skeleton(str(path), task="causal_lm")) == want
    assert param_count(to_meta(live)) == want and next(live.parameters()).device.type == "meta"
    tiny.write_corpus(tmp_path / "data")
    cfg = load_config(data=make_cfg(path, tmp_path / "data", tmp_path / "out", losses=[{"type": "kl"}]))
    _, teacher, _, _ = load_models(cfg, teacher_weights=False)  # as with teacher.cache: copied from, then emptied
    assert next(teacher.parameters()).device.type == "meta" and param_count(teacher) == want
