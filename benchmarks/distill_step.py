"""Cost of one distillation step against its FLOPs-ideal parts.

A 30-block, narrow llama teacher (SmolLM2's depth and vocabulary, width 64) is
distilled into a 6-block student copied from it. Each mode runs the real
``alignkd distill`` loop in its own process, so peak memory (max RSS) is per mode;
the step time is the median of ``step_s`` in metrics.jsonl after warm-up.

    .venv/bin/python -m benchmarks.distill_step [--steps 20] [--batch 4] [--seq 256]

(from the repository root: run as a module, it imports the tests' tiny models as ``tests.tiny``).

The ideal for a KD step is (student CE step) + (teacher forward): the ``ratio``
column divides each mode's step time by that sum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "student_ce": [{"type": "ce"}],
    "kd_logits": [{"type": "kl", "temperature": 2.0}, {"type": "ce", "weight": 0.5}],
    "kd_features": [
        {"type": "kl", "temperature": 2.0},
        {"type": "ce", "weight": 0.5},
        {"type": "hidden", "metric": "standardized"},
        {"type": "relation", "layers": "last"},
    ],
    "kd_features_gradnorm": "kd_features",
}


def build(root: Path, vocab: int) -> None:
    from tests.tiny import save_model, write_corpus

    save_model(root / "teacher", "llama", layers=30, width=64, heads=4, vocab=vocab)
    write_corpus(root / "data", docs=60)


def run_mode(root: Path, mode: str, args) -> dict:
    losses = MODES[mode]
    strategy = "static"
    if isinstance(losses, str):
        losses, strategy = MODES[losses], "gradnorm"
    cfg = {
        "teacher": {"path": str(root / "teacher"), "dtype": "float32"},  # as the teacher-forward timing below
        "student": {"from_teacher": {"layers": [0, 6, 12, 18, 24, 29]}},
        "data": {"train": str(root / "data"), "seq_len": args.seq},
        "losses": losses,
        "weighting": {"strategy": strategy},
        "train": {
            "steps": args.steps, "batch_size": args.batch, "warmup": 2, "eval_every": 0, "eval_batches": 1,
            "progress": False, "mixed_precision": "no", "output_dir": str(root / mode),
        },
    }
    code = (
        "import json, resource, sys; import alignkd; "
        f"alignkd.distill(json.loads({json.dumps(json.dumps(cfg))})); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    rss_kb = int(out.stdout.split("MAXRSS")[-1])
    steps = [json.loads(line) for line in (root / mode / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_s"] for r in steps if r["split"] == "train"][args.warmup :]
    return {"step_s": statistics.median(times), "tok_s": args.batch * args.seq / statistics.median(times), "rss_mb": rss_kb / 1024}


def teacher_forward_time(root: Path, args) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "teacher").eval()
    ids = torch.randint(0, 261, (args.batch, args.seq))
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=49152)
    args = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens, vocab {args.vocab}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.vocab)
        results = {m: run_mode(root, m, args) for m in MODES}
        t_fwd = teacher_forward_time(root, args)
    ideal = results["student_ce"]["step_s"] + t_fwd
    print(f"teacher forward alone: {t_fwd * 1000:.0f} ms; ideal KD step = student CE step + teacher forward = {ideal * 1000:.0f} ms")
    print(f"{'mode':<22}{'step ms':>10}{'tokens/s':>10}{'peak RSS MB':>13}{'ratio':>8}")
    for mode, r in results.items():
        print(f"{mode:<22}{r['step_s'] * 1000:>10.0f}{r['tok_s']:>10.0f}{r['rss_mb']:>13.0f}{r['step_s'] / ideal:>8.2f}")


if __name__ == "__main__":
    main()
