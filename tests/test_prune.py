"""Width pruning: a full-width prune reproduces the teacher; narrower keeps the important channels."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkd.models import ModelError
from alignkd.models.student import from_config
from alignkd.models.width import width_prune
from alignkd.testing import build, config

NARROW = {
    "hidden_size": 48,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
}


def teacher(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(family, layers=4, width=64, heads=4)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_full_width_prune_is_the_teacher(family):
    t = teacher(family)
    s = from_config(t, {}, "causal_lm")
    width_prune(s, t)
    ids = torch.randint(0, 261, (2, 11))
    torch.testing.assert_close(s.eval()(ids).logits, t(ids).logits, atol=1e-5, rtol=1e-5)


def test_full_width_prune_of_a_classifier_is_the_teacher():
    t = build("llama", task="sequence_classification", layers=4, width=64, heads=4)
    s = from_config(t, {}, "sequence_classification")
    width_prune(s, t)
    ids = torch.randint(2, 261, (2, 11))
    torch.testing.assert_close(s.eval()(ids).logits, t(ids).logits, atol=1e-5, rtol=1e-5)
    narrow = from_config(t, NARROW, "sequence_classification")
    width_prune(narrow, t)
    assert narrow.score.weight.shape == (2, 48)
    assert all(any(torch.equal(narrow.score.weight[:, i], t.score.weight[:, j]) for j in range(64)) for i in range(48))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_narrow_prune_keeps_the_most_important_channels(family):
    t = teacher(family)
    with torch.no_grad():
        t.get_input_embeddings().weight[:, 7] *= 50  # make hidden channel 7 the most important
        t.get_input_embeddings().weight[:, 3] *= 1e-3  # and channel 3 the least
        mlp = t.model.layers[3].mlp  # block 3 is the last block kept for 2 of 4
        mlp.gate_proj.weight[5] *= 20
    s = from_config(t, NARROW, "causal_lm")
    width_prune(s, t)
    emb_t, emb_s = t.get_input_embeddings().weight, s.get_input_embeddings().weight
    cols = [
        j for j in range(emb_t.shape[1]) if any(torch.equal(emb_s[:, i], emb_t[:, j]) for i in range(emb_s.shape[1]))
    ]
    assert 7 in cols and 3 not in cols and len(cols) == 48
    gate_rows_t = t.model.layers[3].mlp.gate_proj.weight
    gate_s = s.model.layers[1].mlp.gate_proj.weight
    kept = [
        r
        for r in range(gate_rows_t.shape[0])
        if any(torch.equal(gate_s[i], gate_rows_t[r, cols]) for i in range(gate_s.shape[0]))
    ]
    assert 5 in kept and len(kept) == 96
    ids = torch.randint(0, 261, (2, 11))
    assert torch.isfinite(s(ids).logits).all()


def test_prune_refuses_other_families_and_head_dims():
    t = AutoModelForCausalLM.from_config(config("gpt2", layers=2, width=32))
    with pytest.raises(ModelError, match="llama-like"):
        width_prune(from_config(t, {"n_embd": 16, "n_head": 2}, "causal_lm"), t)
    t = teacher("llama")
    with pytest.raises(ModelError, match="head_dim"):
        width_prune(
            from_config(t, {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}, "causal_lm"), t
        )


# ---------------------------------------------------------------- activation importance


def activation_reference(t, ids):
    """Plain reference: record whole activations, then take the means in the test's own way."""
    from alignkd.models.width import Scores

    outs, o_in, d_in = [], {}, {}
    width, hd = t.config.hidden_size, t.config.hidden_size // t.config.num_attention_heads
    hooks = [
        m.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
        for n, m in t.named_modules()
        if n.endswith("norm") and getattr(m, "weight", None) is not None and m.weight.shape == (width,)
    ]
    for i, b in enumerate(t.model.layers):
        hooks.append(b.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_in.__setitem__(i, a[0].detach())))
        hooks.append(b.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: d_in.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        t.model(input_ids=ids)
    for h in hooks:
        h.remove()
    n = ids.numel()
    hidden = sum(o.abs().reshape(n, width).mean(0) for o in outs)
    heads = [
        torch.stack(
            [o_in[i][..., h * hd : (h + 1) * hd].norm(dim=-1).mean() for h in range(t.config.num_attention_heads)]
        )
        for i in o_in
    ]
    group = t.config.num_attention_heads // t.config.num_key_value_heads
    return Scores(
        hidden,
        heads,
        [h.reshape(-1, group).sum(1) for h in heads],
        [d_in[i].abs().reshape(n, -1).mean(0) for i in d_in],
    )


def test_activation_scores_match_the_plain_reference():
    from alignkd.models.width import activation_scores

    t = teacher("llama")
    ids = torch.randint(0, 261, (5, 13), generator=torch.Generator().manual_seed(1))
    got, want = activation_scores(t, ids, batch_size=2), activation_reference(t, ids)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-6)
    for field in ("query_heads", "kv_heads", "mlp"):
        for a, b in zip(getattr(got, field), getattr(want, field), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_full_width_prune_by_activations_is_the_teacher(family):
    from alignkd.models.width import activation_scores

    t = teacher(family)
    s = from_config(t, {}, "causal_lm")
    width_prune(s, t, activation_scores(t, torch.randint(0, 261, (4, 16))))
    ids = torch.randint(0, 261, (2, 11))
    torch.testing.assert_close(s.eval()(ids).logits, t(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_head_that_carries_nothing_is_pruned_by_activation_not_by_weight():
    """kv head 0 of the last block is silenced (its v rows zeroed) while its k and o weights are made the largest:
    weight norms would keep it, activations drop it."""
    from alignkd.models.width import activation_scores

    t = teacher("llama")
    hd, a = 16, t.model.layers[3].self_attn
    with torch.no_grad():
        a.v_proj.weight[:hd] = 0.0  # query heads 0 and 1 (kv group 0) now output exactly 0
        a.k_proj.weight[:hd] *= 100
        a.o_proj.weight[:, : 2 * hd] *= 100
    scores = activation_scores(t, torch.randint(0, 261, (4, 16)))
    assert scores.kv_heads[3][0] == 0 and (scores.query_heads[3][:2] == 0).all() and (scores.kv_heads[3][1:] > 0).all()

    def kept_silent_head(scores_or_none) -> bool:
        s = from_config(t, NARROW, "causal_lm")  # 1 kv head kept of 2
        width_prune(s, t, scores_or_none)
        return bool((s.model.layers[1].self_attn.v_proj.weight == 0).all())

    assert kept_silent_head(None)  # weight norms keep the silent head
    assert not kept_silent_head(scores)
    # MLP channels: one whose up row is zero carries nothing and scores 0.
    with torch.no_grad():
        t.model.layers[3].mlp.up_proj.weight[5] = 0.0
    assert activation_scores(t, torch.randint(0, 261, (4, 16))).mlp[3][5] == 0
