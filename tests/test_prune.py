"""Width pruning: a full-width prune reproduces the teacher; narrower keeps the important channels."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkd.models import ModelError
from alignkd.models.prune import width_prune
from alignkd.models.student import from_config
from tiny import config

NARROW = {"hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 96, "num_hidden_layers": 2}


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
    cols = [j for j in range(emb_t.shape[1]) if any(torch.equal(emb_s[:, i], emb_t[:, j]) for i in range(emb_s.shape[1]))]
    assert 7 in cols and 3 not in cols and len(cols) == 48
    gate_rows_t = t.model.layers[3].mlp.gate_proj.weight
    gate_s = s.model.layers[1].mlp.gate_proj.weight
    kept = [r for r in range(gate_rows_t.shape[0]) if any(torch.equal(gate_s[i], gate_rows_t[r, cols]) for i in range(gate_s.shape[0]))]
    assert 5 in kept and len(kept) == 96
    ids = torch.randint(0, 261, (2, 11))
    assert torch.isfinite(s(ids).logits).all()


def test_prune_refuses_other_families_and_head_dims():
    t = AutoModelForCausalLM.from_config(config("gpt2", layers=2, width=32))
    with pytest.raises(ModelError, match="llama-like"):
        width_prune(from_config(t, {"n_embd": 16, "n_head": 2}, "causal_lm"), t)
    t = teacher("llama")
    with pytest.raises(ModelError, match="head_dim"):
        width_prune(from_config(t, {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}, "causal_lm"), t)
