"""``alignkd finetune``: train a model on the ground truth alone, with the distillation engine.

Two uses: teacher correction (Minitron: a light fine-tune of the teacher on the
distillation data before distilling, which shifts it towards that data), and a
classifier teacher made offline from a causal LM checkpoint. The config is an
ordinary distillation config: its ``teacher.path`` is the model to fine-tune and
its data, ``data.*`` and ``train.*`` apply as they are. The student becomes that
checkpoint, the loss cross-entropy alone, so the teacher's forward never runs and
its weights are never loaded twice. ``OUTPUT_DIR/student/`` is the fine-tuned
model, ready to be the ``teacher.path`` of the distillation.
"""

from __future__ import annotations

import copy

from alignkd.config import Config, resolved
from alignkd.config.schema import StudentConfig, WeightingConfig
from alignkd.terms.outputs import CEConfig


def finetune_config(cfg: Config) -> Config:
    """``cfg`` turned into the fine-tuning of its teacher: student = ``teacher.path``, loss = ``ce``, static weights."""
    out = copy.deepcopy(cfg)
    out.student = StudentConfig(path=cfg.teacher.path, dtype=cfg.student.dtype)
    out.losses = [CEConfig(type="ce")]
    out.weighting = WeightingConfig()
    out.teacher.cache = None
    resolved(out)
    return out


def finetune(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune ``cfg.teacher.path`` on ``cfg``'s data with cross-entropy; returns the run's summary.

    ``summary["teacher_eval"]`` is the model before fine-tuning, ``student_eval`` after.
    """
    from alignkd.engine.run import distill

    return distill(finetune_config(cfg), resume=resume, overwrite=overwrite)
