"""What each command does: its flags turned into the domain's arguments, and what it returns printed.

Heavy dependencies (torch, transformers) are imported inside the functions, only when a command runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alignkd.errors import ConfigError, EvalError, ReportError


def _distill(args) -> int:
    import yaml

    from alignkd.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0

    from alignkd.engine.loop import Preempted
    from alignkd.engine.run import distill

    try:
        summary = distill(cfg, resume=args.resume, overwrite=args.overwrite)
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(stop)
        return 0  # a preempted job ended as asked; the scheduler may restart it with --resume
    if os.environ.get("RANK", "0") != "0":  # one summary line per run, not per process
        return 0
    key, student, teacher = _held_out(summary)
    print(
        f"student saved to {summary['student_dir']} ({summary['student_params'] / 1e6:.2f}M params vs teacher "
        f"{summary['teacher_params'] / 1e6:.2f}M); held-out {key}: student {student:.4g}, teacher {teacher:.4g}"
    )
    return 0


def _held_out(summary: dict) -> tuple[str, float, float]:
    """The run's headline held-out metric: its name, the student's value and the teacher's."""
    s, t = summary["student_eval"], summary["teacher_eval"]
    key = "eval_ppl" if "eval_ppl" in s else "eval_accuracy" if "eval_accuracy" in s else "eval_loss"
    return key, s.get(key, float("nan")), t.get(key, float("nan"))


def _cache_teacher(args) -> int:

    from alignkd.config import load_config
    from alignkd.engine.cache_teacher import cache_teacher

    cache_teacher(load_config(args.config, args.overrides), overwrite=args.overwrite, say=print)
    return 0


def _choose_blocks(args) -> int:

    from alignkd.config import load_config
    from alignkd.engine.block_choice import choose_blocks_only

    selection, path = choose_blocks_only(load_config(args.config, args.overrides))
    s = selection.scores
    columns = {"block_influence": "influence", "block_removal_loss_increase": "removal +loss"}
    shown = [k for k in columns if k in s]
    print("block  " + "  ".join(f"{columns[k]:>13}" for k in shown) + "  kept")
    for i in range(s["teacher_blocks"]):
        print(f"{i:>5}  " + "  ".join(f"{s[k][i]:>13.5g}" for k in shown) + ("     *" if i in selection.layers else ""))
    for key, what in (("span_angular_distance", "angular distance"), ("span_removal_loss_increase", "removal +loss")):
        if s.get(key):
            start = min(range(len(s[key])), key=lambda i: (s[key][i], i))
            last = start + s["span_blocks"] - 1
            print(f"lowest {what} over {s['span_blocks']} contiguous blocks: {start}..{last} ({s[key][start]:.5g})")
    for c in s.get("candidates", []):
        print(f"probe {c['rule']:<16} {c['layers']}: held-out loss {c['probe_loss']:.4f}")
    print(f"chosen by {selection.rule}: {selection.layers}")
    print(f"wrote {path}")
    return 0


def _finetune(args) -> int:

    from alignkd.config import load_config
    from alignkd.engine.finetune import finetune

    summary = finetune(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        key, after, before = _held_out(summary)  # the "teacher" is the model before fine-tuning
        print(
            f"fine-tuned model saved to {summary['student_dir']} (use it as teacher.path); held-out {key}: "
            f"before {before:.4g}, after {after:.4g}"
        )
    return 0


def _eval(args) -> int:

    from alignkd.evaluate import EvalSettings, evaluate_models, print_table

    models = {"teacher": args.teacher, "student": args.model} if args.teacher else {"model": args.model}
    for item in args.baseline:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--baseline {item!r} is not NAME=PATH; write e.g. --baseline ce=runs/ce/student")
        if name in models:
            raise EvalError(f"--baseline name {name!r} is taken; choose another name")
        models[name] = path
    settings = EvalSettings(
        text=args.text,
        labelled=args.labelled,
        ppl_tokens=args.ppl_tokens,
        window=args.window,
        stride=args.stride,
        examples=args.examples,
        shots=args.shots,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        latency_batch=args.latency_batch,
        latency_len=args.latency_len,
        dtype=args.dtype,
        skip=tuple(args.skip),
        tasks=tuple(args.tasks),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_paths=tuple(args.task_path),
    )
    result = evaluate_models(models, settings, teacher="teacher" if args.teacher else None, out=args.out)
    print_table(result)
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def _report(args) -> int:
    from alignkd.report import write_report

    baselines = {}
    for spec in args.baseline_run:
        name, sep, path = spec.partition("=")
        if not sep:  # a bare folder: named after itself
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ReportError(f"--baseline-run expects NAME=DIR, got {spec!r}")
        baselines[name] = path
    paths = write_report(args.run_dir, eval_json=args.eval_json, baselines=baselines, out=args.out)
    print(f"report: {paths['html']}")
    print(f"report: {paths['md']}")
    return 0


def _assets(args) -> int:
    from alignkd.assets import prepare, prepared

    prepare(args.cache, args.only, args.force)
    for name, folder, holds in prepared(args.cache, args.only):
        print(f"{name:<9}  {folder}  ({holds})")
    return 0


def _demo(args) -> int:
    # Checked before the first stage: the demo starts by fetching its assets.
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: give at least 1 step, or leave --steps out for the time budget")
    if args.minutes is not None and not args.minutes > 0:
        raise ConfigError(f"--minutes {args.minutes:g}: the time budget must be > 0 minutes")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; choose a folder for the demo's runs and report")

    from alignkd.demo import run

    result = run(steps=args.steps, out=args.out, minutes=args.minutes)
    print(f"report: {result['report']}")
    return 0


def _study(args) -> int:
    from alignkd.study import load_study

    study = load_study(args.study)  # a bad study file stops here, before any stand-in or run
    out = Path(args.out or Path("runs") / "study" / (study.path.stem + ("-quick" if args.quick else "")))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder for the study's runs and tables")

    from alignkd.study import run_study

    result = run_study(study, out, quick=args.quick, only=args.only)
    for name in ("study.md", "study.html", "study.json"):
        print(f"wrote {out / name}")
    failed = [v["name"] for v in result["variants"] if v["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see study.md)", file=sys.stderr)
    return 1 if failed else 0


def _export(args) -> int:
    from alignkd.export.gguf_file import export_gguf

    done = export_gguf(args.student, args.gguf, dtype=args.dtype)
    print(
        f"wrote {done['path']} ({done['params'] / 1e6:.2f}M params, {done['dtype']} matrices, {done['tensors']} "
        f"tensors, {done['bytes'] / 1e6:.1f} MB); run it with llama.cpp (llama-cli -m {done['path']}) or Ollama "
        f"(FROM {done['path']} in a Modelfile)"
    )
    return 0


# The command names and what runs each.
COMMANDS = {
    "distill": _distill,
    "cache-teacher": _cache_teacher,
    "finetune": _finetune,
    "choose-blocks": _choose_blocks,
    "assets": _assets,
    "eval": _eval,
    "report": _report,
    "demo": _demo,
    "study": _study,
    "export": _export,
}
