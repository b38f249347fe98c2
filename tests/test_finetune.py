"""``alignkd finetune``: a model trained on the ground truth alone, on the distillation engine.

The teacher of a distillation config is fine-tuned on its data (teacher
correction); a causal LM checkpoint becomes a classifier. The teacher's forward
never runs and its weights are not loaded a second time.
"""

from __future__ import annotations

import copy
import json

import yaml
from test_engine import _classification_jsonl, make_cfg, make_run, read_metrics
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkd.config import load_config
from alignkd.engine.finetune import finetune, finetune_config


def distill_cfg(teacher, data, out, **train):
    """A distillation config with feature terms and a copied student: fine-tuning replaces both."""
    losses = [{"type": "kl"}, {"type": "hidden", "layers": [[0, 1]]}]
    return make_cfg(teacher, data, out, losses=losses, student={"from_teacher": {"layers": [1]}}, **train)


def test_the_config_becomes_the_teacher_trained_on_cross_entropy(teacher, corpus, tmp_path):
    cfg = finetune_config(load_config(data=distill_cfg(teacher, corpus, tmp_path / "ft")))
    assert cfg.student.path == str(teacher) and cfg.student.from_teacher is None
    assert [t.type for t in cfg.losses] == ["ce"] and cfg.weighting.strategy == "static"
    run = make_run(json.loads(json.dumps(_as_dict(cfg))))
    assert all(p.device.type == "meta" for p in run.teacher.model.parameters())  # never loaded twice
    assert not run.needs_teacher


def _as_dict(cfg):
    from alignkd.config import to_dict

    return to_dict(cfg)


def test_teacher_correction_lowers_the_held_out_loss_and_saves_a_loadable_model(teacher, corpus, tmp_path):
    out = tmp_path / "ft"
    cfg = distill_cfg(teacher, corpus, out, steps=12, lr=1e-2, eval_batches=2)
    summary = finetune(load_config(data=copy.deepcopy(cfg)))
    before, after = summary["teacher_eval"]["eval_loss"], summary["student_eval"]["eval_loss"]
    assert after < before - 0.2, (before, after)
    rows, _ = read_metrics(out)
    assert len(rows) == 12 and all(set(k for k in r if k.startswith("loss/")) == {"loss/ce"} for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2  # the whole teacher, not the config's 1-block student
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["student"]["path"] == str(teacher) and saved["losses"] == [
        {"type": "ce", "weight": 1.0, "name": "ce", "weight_schedule": None}
    ]


def test_a_causal_lm_checkpoint_becomes_a_classifier(teacher, tmp_path):
    data = _classification_jsonl(tmp_path / "train.jsonl", rows=64)
    out = tmp_path / "clf"
    cfg = make_cfg(
        teacher,
        data,
        out,
        losses=[{"type": "kl"}],
        task="sequence_classification",
        steps=15,
        lr=3e-3,
        batch_size=8,
        eval_batches=2,
    )
    cfg["data"]["seq_len"] = 32
    summary = finetune(load_config(data=cfg))
    assert "eval_accuracy" in summary["student_eval"] and "eval_accuracy" in summary["teacher_eval"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert model.config.num_labels == 2 and model.config.pad_token_id is not None


def test_the_command_line_reports_before_and_after(teacher, corpus, tmp_path, capsys):
    from alignkd.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(distill_cfg(teacher, corpus, tmp_path / "cli", steps=2)))
    assert main(["finetune", str(path), f"train.output_dir={tmp_path / 'cli'}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(
        f"fine-tuned model saved to {tmp_path / 'cli' / 'student'} (use it as teacher.path); held-out eval_ppl: before "
    )
