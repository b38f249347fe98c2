"""Writes the recorded runs the report tests read (run once; the outputs are committed).

    python tests/data/report_run/generate.py

Synthetic but shaped exactly like ``alignkd distill`` output (see alignkd/engine/loop.py):
a 60-step feature-alignment run (kl, ce, hidden, relation under GradNorm, a linear
temperature schedule on kl, eval every 20 steps) in ``report_run/`` with its
config, summary and an ``alignkd eval`` eval.json (teacher, student, baseline), and
a CE-only baseline run in ``report_baseline/``. Values are rounded so the files
are byte-identical wherever this runs. One training record carries a NaN grad
norm, as a diverged step would, so the committed data exercises that path too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
STEPS, EVAL_EVERY, WARMUP, LR = 60, 20, 6, 3e-4
TERMS = ("kl", "ce", "hidden", "relation")


def r(x: float, n: int = 4) -> float:
    return round(x, n) if math.isfinite(x) else x


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    frac = (step - WARMUP) / (STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def wiggle(step: int, k: int) -> float:
    # Deterministic "noise": a couple of incommensurate sines per term.
    return 0.06 * math.sin(1.7 * step + k) + 0.04 * math.sin(0.37 * step * (k + 1))


def terms_at(step: int) -> dict[str, float]:
    t = step / STEPS
    return {
        "kl": 5.5 * math.exp(-3.2 * t) + 0.9,
        "ce": 6.8 * math.exp(-2.4 * t) + 3.1,
        "hidden": 1.4 * math.exp(-2.0 * t) + 0.35,
        "relation": 0.6 * math.exp(-7.5 * t) + 0.0015,  # spans > 2 decades: log axis
    }


def weights_at(step: int) -> list[float]:
    # GradNorm-like: slow terms gain weight, fast ones lose it; renormalised to sum to 4.
    t = step / STEPS
    raw = [1.0 + 0.35 * t, 1.0 - 0.2 * t + 0.05 * math.sin(6 * t), 1.0 + 0.25 * math.sin(3 * t), 1.0 - 0.4 * t]
    s = sum(raw)
    return [4 * w / s for w in raw]


def ppl_at(step: int, *, baseline: bool = False) -> float:
    t = step / STEPS
    return (40.0 + 900 * math.exp(-5 * t)) if baseline else (31.0 + 1400 * math.exp(-6 * t))


def distilled() -> list[dict]:
    lines = []
    for step in range(STEPS):
        base = terms_at(step)
        losses = {n: max(v * (1 + wiggle(step, k)), 1e-4) for k, (n, v) in enumerate(base.items())}
        w = weights_at(step)
        loss = sum(wi * losses[n] for wi, n in zip(w, TERMS, strict=True))
        rec = {"split": "train", "step": step + 1, "loss": r(loss)}
        rec.update({f"loss/{n}": r(losses[n]) for n in TERMS})
        rec.update({f"w/{n}": r(wi) for wi, n in zip(w, TERMS, strict=True)})
        rec["temperature/kl"] = r(4.0 + (1.0 - 4.0) * step / STEPS)
        rec.update(
            {
                "lr": r(lr_at(step), 9),
                "tokens_per_s": r(2048 / (0.8 + 0.05 * math.sin(step)), 2),
                "step_s": r(0.8 + 0.05 * math.sin(step), 4),
            }
        )
        rec["grad_norm"] = (
            float("nan") if step + 1 == 17 else r(2.5 * math.exp(-step / 25) + 0.4 + 0.1 * math.sin(step))
        )
        lines.append(rec)
        if (step + 1) % EVAL_EVERY == 0:
            ppl = ppl_at(step + 1)
            lines.append({"eval_loss": r(math.log(ppl)), "eval_ppl": r(ppl, 4), "split": "eval", "step": step + 1})
    return lines


def ce_baseline() -> list[dict]:
    lines = []
    for step in range(STEPS):
        ce = (7.5 * math.exp(-2.0 * step / STEPS) + 3.3) * (1 + wiggle(step, 7))
        rec = {"split": "train", "step": step + 1, "loss": r(ce), "loss/ce": r(ce), "w/ce": 1.0}
        rec.update(
            {
                "lr": r(lr_at(step), 9),
                "tokens_per_s": 3100.0,
                "step_s": 0.66,
                "grad_norm": r(1.5 * math.exp(-step / 30) + 0.3),
            }
        )
        lines.append(rec)
        if (step + 1) % EVAL_EVERY == 0:
            ppl = ppl_at(step + 1, baseline=True)
            lines.append({"eval_loss": r(math.log(ppl)), "eval_ppl": r(ppl, 4), "split": "eval", "step": step + 1})
    return lines


def config(out: str, losses: list[str]) -> str:
    cmd = [
        sys.executable,
        "-m",
        "alignkd.cli",
        "distill",
        "configs/feature_alignment.yaml",
        "--print-config",
        "train.steps=60",
        "train.eval_every=20",
        f"train.output_dir={out}",
        "data.train=data/moby_dick",
    ]
    cmd += losses
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def eval_json() -> dict:
    settings = {
        "text": "data/moby_dick_heldout.txt",
        "labelled": "data/sentiment_test.csv",
        "device": "cpu",
        "dtype": "float32",
        "ppl_tokens": 16384,
        "window": 512,
        "stride": 256,
        "examples": 200,
        "shots": 4,
        "prompts": 16,
        "new_tokens": 32,
        "latency_batch": 1,
        "latency_len": 128,
    }
    teacher = {
        "perplexity": 18.1234,
        "ppl_tokens_scored": 16128,
        "accuracy": 0.81,
        "accuracy_examples": 200,
        "bleu": 3.2461,
        "rouge1": 0.21437,
        "rouge2": 0.05219,
        "rougeL": 0.18406,
        "cer": 0.70312,
        "prefill_ms_per_token": 1.2345,
        "decode_ms_per_token": 9.0123,
        "prefill_tokens_per_s": 810.0,
        "decode_tokens_per_s": 110.96,
        "params": 134515008,
        "non_embedding_params": 106203456,
        "size_mb": 513.13,
    }
    student = {
        "perplexity": 36.2468,
        "ppl_tokens_scored": 16128,
        "accuracy": 0.645,
        "accuracy_examples": 200,
        "bleu": 2.5871,
        "rouge1": 0.19345,
        "rouge2": 0.04011,
        "rougeL": 0.17123,
        "cer": 0.73456,
        "prefill_ms_per_token": 0.3971,
        "decode_ms_per_token": 2.5713,
        "prefill_tokens_per_s": 2518.3,
        "decode_tokens_per_s": 388.91,
        "params": 49557312,
        "non_embedding_params": 21245760,
        "size_mb": 189.05,
        "bleu_vs_teacher": 20.1357,
        "rouge1_vs_teacher": 0.30412,
        "rouge2_vs_teacher": 0.10234,
        "rougeL_vs_teacher": 0.28111,
        "cer_vs_teacher": 0.61234,
    }
    baseline = {
        "perplexity": 45.1012,
        "ppl_tokens_scored": 16128,
        "accuracy": 0.585,
        "accuracy_examples": 200,
        "bleu": 1.9354,
        "rouge1": 0.16789,
        "rouge2": 0.02987,
        "rougeL": 0.15032,
        "cer": 0.75021,
        "prefill_ms_per_token": 0.4012,
        "decode_ms_per_token": 2.5588,
        "prefill_tokens_per_s": 2492.5,
        "decode_tokens_per_s": 390.81,
        "params": 49557312,
        "non_embedding_params": 21245760,
        "size_mb": 189.05,
        "bleu_vs_teacher": 11.4021,
        "rouge1_vs_teacher": 0.24503,
        "rouge2_vs_teacher": 0.06012,
        "rougeL_vs_teacher": 0.22456,
        "cer_vs_teacher": 0.68123,
    }

    def retention(m: dict) -> dict:
        return {
            "perplexity": r(teacher["perplexity"] / m["perplexity"], 4),
            "accuracy": r(m["accuracy"] / teacher["accuracy"], 4),
            **{k: r(m[k] / teacher[k], 4) for k in ("bleu", "rouge1", "rouge2", "rougeL")},
            "cer": r(teacher["cer"] / m["cer"], 4),
            "prefill_speedup": r(teacher["prefill_ms_per_token"] / m["prefill_ms_per_token"], 4),
            "decode_speedup": r(teacher["decode_ms_per_token"] / m["decode_ms_per_token"], 4),
            "params": r(m["params"] / teacher["params"], 4),
        }

    return {
        "settings": settings,
        "models": {
            "teacher": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct", "metrics": teacher},
            "student": {"path": "runs/feature_alignment/student", "metrics": student},
            "baseline": {"path": "runs/ce_baseline/student", "metrics": baseline},
        },
        "retention": {"student": retention(student), "baseline": retention(baseline)},
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))


def main() -> None:
    run, base = HERE, HERE.parent / "report_baseline"
    base.mkdir(exist_ok=True)
    recs = distilled()
    write_jsonl(run / "metrics.jsonl", recs)
    (run / "config.yaml").write_text(
        config("runs/feature_alignment", ["losses.0.temperature_schedule={kind: linear, start: 4.0, end: 1.0}"])
    )
    last_train = [x for x in recs if x["split"] == "train"][-1]
    last_eval = {k: v for k, v in recs[-1].items() if k.startswith("eval_")}
    summary = {
        "steps": STEPS,
        "train_seconds": 49.31,
        "teacher_params": 134515008,
        "student_params": 49557312,
        "teacher_eval": {"eval_loss": r(math.log(17.4)), "eval_ppl": 17.4},
        "student_eval": last_eval,
        "last_train": last_train,
        "student_dir": "runs/feature_alignment/student",
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    (run / "eval.json").write_text(json.dumps(eval_json(), indent=2))
    write_jsonl(base / "metrics.jsonl", ce_baseline())
    (base / "config.yaml").write_text(config("runs/ce_baseline", ["losses=[{type: ce}]", "weighting.strategy=static"]))


if __name__ == "__main__":
    main()
