"""Every exported student carries a model card: ``student/README.md`` in the Hugging Face format."""

from __future__ import annotations

import pytest
import yaml

import alignkd
from alignkd.models.card import front_matter, model_card
from tests.test_engine import make_cfg


def _card(**kw) -> str:
    args = {
        "name": "tiny-student",
        "teacher": "someorg/teacher-7b",
        "task": "causal_lm",
        "config": {"losses": [{"type": "kl"}, {"type": "ce"}], "train": {"steps": 3}},
        "teacher_eval": {"eval_loss": 2.5, "eval_ppl": 12.18},
        "student_eval": {"eval_loss": 3.0, "eval_ppl": 20.09},
        "teacher_params": 7_000_000_000,
        "student_params": 1_000_000_000,
        "steps": 3,
        "version": "0.1.0",
    }
    return model_card(**{**args, **kw})


def test_the_card_names_its_teacher_recipe_numbers_and_size():
    text = _card()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "someorg/teacher-7b" and "distillation" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert "| held-out perplexity (per token of the model's own tokenizer) | 12.18 | 20.09 |" in text
    assert "1000.00M (14.3% of the teacher's)" in text
    assert "3 optimizer steps of kl, ce" in text
    assert "alignkd distill config.yaml" in text
    recipe = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe)["losses"][0] == {"type": "kl"}


def test_a_local_teacher_is_not_a_base_model_but_its_license_and_base_model_carry_over(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/base\n---\n# A teacher\n")
    meta = yaml.safe_load(_card(teacher=str(tmp_path)).split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/base"
    bare = tmp_path / "bare"
    bare.mkdir()
    meta = yaml.safe_load(_card(teacher=str(bare)).split("---")[1])
    assert "base_model" not in meta and "license" not in meta
    assert front_matter(tmp_path / "missing.md") == {}


@pytest.mark.slow  # one short run
def test_a_distilled_student_folder_has_a_card_huggingface_hub_reads(teacher, corpus, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    alignkd.distill(make_cfg(teacher, corpus, out, losses=[{"type": "kl"}, {"type": "ce"}]))
    card = ModelCard.load(out / "student" / "README.md")
    assert "distillation" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert "held-out perplexity" in card.text and "kl, ce" in card.text
