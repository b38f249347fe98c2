"""The model card of an exported student: a ``README.md`` in the Hugging Face model card format.

It says where the student came from: the teacher (``base_model`` where the
teacher is a hub id, and the teacher's license where its folder states one),
the recipe (the run's config), the held-out numbers of both models, the sizes,
and the command that makes the student again.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from alignkd.models.loading import looks_local

PIPELINES = {
    "causal_lm": "text-generation",
    "sequence_classification": "text-classification",
    "masked_lm": "fill-mask",
}
HELD_OUT = {
    "eval_loss": "held-out loss (nats per token)",
    "eval_ppl": "held-out perplexity (per token of the model's own tokenizer)",
    "eval_bpb": "held-out bits per byte",
    "eval_accuracy": "held-out accuracy",
}


def front_matter(path: Path) -> dict:
    """The YAML metadata at the head of a ``README.md`` (empty when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        data = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def metadata(teacher: str, task: str, peft: dict | None = None) -> dict:
    """The card's YAML head: the teacher as ``base_model`` when it is a hub id (else the base model its own card
    names), the license its card states, the pipeline and the tags. ``peft``: the run's ``student.peft``; an
    adapter folder (``merge: false``) is then a peft library folder."""
    local = looks_local(teacher) or Path(teacher).expanduser().exists()
    teacher_meta = front_matter(Path(teacher).expanduser() / "README.md") if local else {}
    adapter = bool(peft) and not peft.get("merge", True)
    meta: dict = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": PIPELINES.get(task, "text-generation"),
    }
    base = teacher if not local else teacher_meta.get("base_model")
    if isinstance(base, str) and base:
        meta["base_model"] = base
    if teacher_meta.get("license"):
        meta["license"] = teacher_meta["license"]
    meta["tags"] = [
        "distillation",
        "knowledge-distillation",
        "alignkd",
        *([str(peft.get("method", "lora"))] if peft else []),
    ]
    return meta


def model_card(
    *,
    name: str,
    teacher: str,
    task: str,
    config: dict,
    teacher_eval: dict,
    student_eval: dict,
    teacher_params: int,
    student_params: int,
    steps: int,
    version: str,
) -> str:
    """The card's text. ``teacher``: the teacher's path or hub id; ``config``: the run's resolved config (what
    ``config.yaml`` holds); ``*_eval``: the held-out numbers (``eval_loss``, ``eval_ppl``, ...)."""
    terms = ", ".join(str(t.get("type")) for t in config.get("losses", []))
    peft = (config.get("student") or {}).get("peft")
    rows = [
        f"| {label} | {_number(teacher_eval.get(key))} | {_number(student_eval.get(key))} |"
        for key, label in HELD_OUT.items()
        if key in teacher_eval or key in student_eval
    ]
    share = student_params / teacher_params if teacher_params else float("nan")
    lines = [
        "---",
        yaml.safe_dump(metadata(teacher, task, peft), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"Distilled from `{teacher}` with alignkd {version}: {steps} optimizer steps of {terms}.",
        "",
        *_adapter_lines(peft),
        "## Size",
        "",
        "| | teacher | student |",
        "|---|---:|---:|",
        f"| parameters | {teacher_params / 1e6:.2f}M | {student_params / 1e6:.2f}M ({share:.1%} of the teacher's) |",
        "",
        "## Held-out numbers from the run",
        "",
        "On the run's own held-out blocks (`data.eval`, or the share of the training blocks it held out), at its "
        "last evaluation.",
        "",
        "| metric | teacher | student |",
        "|---|---:|---:|",
        *rows,
        "",
        "## Recipe",
        "",
        "The run's config (`config.yaml` beside this folder):",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
        "## Reproduce",
        "",
        f"With alignkd {version} installed and the same teacher and data at the paths above:",
        "",
        "```bash",
        "alignkd distill config.yaml",
        "```",
        "",
    ]
    return "\n".join(lines)


def _adapter_lines(peft: dict | None) -> list[str]:
    """What a PEFT student's card says of its adapters (nothing for a fully trained student)."""
    if not peft:
        return []
    what = (
        "folded into the weights of this folder"
        if peft.get("merge", True)
        else "this folder is the adapter: load it with `PeftModel.from_pretrained(base, folder)`, the base being "
        "`base_model_name_or_path` in `adapter_config.json`"
    )
    targets = ", ".join(map(str, peft.get("target_modules", [])))
    return [f"Only {peft.get('method')} adapters (rank {peft.get('r')}, on {targets}) were trained; {what}.", ""]


def _number(value) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.4g}"
