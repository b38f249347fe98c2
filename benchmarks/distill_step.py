"""Cost of one distillation step against its FLOPs-ideal parts.

A 30-block, narrow llama teacher (SmolLM2's depth and vocabulary, width 64) is
distilled into a 6-block student copied from it (``--teacher PATH``: a real 30-block
model instead, e.g. the demo's SmolLM2-135M in ~/.cache/alignkd/teacher). Each mode
runs the real ``alignkd distill`` loop in its own process, so peak memory (max RSS)
is per mode; the step time is the median of ``step_s`` in metrics.jsonl after warm-up.

    .venv/bin/python -m benchmarks.distill_step [--steps 20] [--batch 4] [--seq 256]
        [--mixed-precision no|bf16|fp16] [--fused|--no-fused|--fused-both] [--modes demo,kd_logits]

(from the repository root, as a module; the tiny teacher and corpus come from ``alignkd.testing``).

``--mixed-precision bf16`` runs as ``auto`` does on a CPU or GPU with fast bf16:
teacher weights in bf16, the student under bf16 autocast. ``--fused-both`` (the
default) runs every mode twice, with ``train.fused_head`` on (the output terms go
through the LM heads in chunks; the row shows whether the run really fused) and
off (full logits), and prints both medians. The ``demo`` mode is the demo's
distillation terms and weighting; with the demo's teacher, ``--batch 8 --seq 128``
and ``--mixed-precision bf16`` it is the demo's KD step.

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
    # alignkd demo: output KL + hidden-state and q/k/v relation alignment under GradNorm
    "demo": [
        {"type": "kl", "kind": "forward", "temperature": 1.0},
        {"type": "hidden", "metric": "standardized", "layers": "auto"},
        {"type": "relation", "of": ["q", "k", "v"], "layers": "last"},
    ],
}
WEIGHTING = {
    "kd_features_gradnorm": {"strategy": "gradnorm"},
    "demo": {"strategy": "gradnorm", "alpha": 1.5, "every": 4},
}


def build(root: Path, vocab: int, real_teacher: bool) -> None:
    from alignkd.testing import save_model, write_corpus

    if not real_teacher:
        save_model(root / "teacher", "llama", layers=30, width=64, heads=4, vocab=vocab)
    write_corpus(root / "data", docs=60)


def teacher_dtype(args) -> str:
    """As ``auto`` resolves it: bf16 weights where the autocast is bf16 (fast bf16), else float32."""
    return "bfloat16" if args.mixed_precision == "bf16" else "float32"


def run_mode(root: Path, mode: str, fused: bool, args) -> dict:
    losses = MODES[mode]
    if isinstance(losses, str):
        losses = MODES[losses]
    out = root / f"{mode}-{'fused' if fused else 'logits'}"
    cfg = {
        "teacher": {
            "path": str(args.teacher or root / "teacher"),
            "dtype": teacher_dtype(args),
        },  # as the teacher-forward timing below
        "student": {"from_teacher": {"layers": [0, 6, 12, 18, 24, 29]}},
        "data": {"train": str(root / "data"), "seq_len": args.seq},
        "losses": losses,
        "weighting": WEIGHTING.get(mode, {"strategy": "static"}),
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "warmup": 2,
            "eval_every": 0,
            "eval_batches": 1,
            "progress": False,
            "mixed_precision": args.mixed_precision,
            "fused_head": fused,
            "output_dir": str(out),
        },
    }
    # Whether the run fused is read off the run itself: the engine may decline (see fused_heads).
    code = (
        "import json, resource, sys; import alignkd; from alignkd.engine import setup as R; "
        "seen = []; real = R.fused_heads; "
        "R.fused_heads = lambda *a: seen.append(real(*a)) or seen[-1]; "
        f"alignkd.distill(json.loads({json.dumps(json.dumps(cfg))})); "
        "print('FUSED', seen[-1] is not None); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(proc.stdout.split("MAXRSS")[-1])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_s"] for r in steps if r["split"] == "train"][args.warmup :]
    return {
        "step_s": statistics.median(times),
        "tok_s": args.batch * args.seq / statistics.median(times),
        "rss_mb": rss_kb / 1024,
        "fused": "FUSED True" in proc.stdout,
    }


def teacher_forward_time(root: Path, args) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[teacher_dtype(args)]
    model = AutoModelForCausalLM.from_pretrained(args.teacher or root / "teacher", dtype=dtype).eval()
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
    p.add_argument("--vocab", type=int, default=49152, help="of the random teacher")
    p.add_argument("--teacher", type=Path, help="a real 30-block causal LM to distil instead of the random narrow one")
    p.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "bf16", "fp16"],
        help="train.mixed_precision (bf16: teacher in bf16 too)",
    )
    head = p.add_mutually_exclusive_group()
    head.add_argument("--fused", dest="heads", action="store_const", const=(True,), help="train.fused_head on only")
    head.add_argument("--no-fused", dest="heads", action="store_const", const=(False,), help="full logits only")
    head.add_argument(
        "--fused-both", dest="heads", action="store_const", const=(True, False), help="both, one row each (default)"
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = p.parse_args()
    heads = args.heads or (True, False)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    import torch

    teacher = args.teacher or f"random llama, width 64, vocab {args.vocab}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; teacher {teacher} ({teacher_dtype(args)}); "
        f"batch {args.batch} x {args.seq} tokens; mixed precision {args.mixed_precision}; "
        f"median of {args.steps - args.warmup} steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.vocab, real_teacher=args.teacher is not None)
        # Fused and unfused runs of a mode back to back, so that a change in machine load hits both.
        results = {(m, f): run_mode(root, m, f, args) for m in modes for f in heads}
        t_fwd = teacher_forward_time(root, args)
    base = [r["step_s"] for (m, _), r in results.items() if m == "student_ce"]
    ideal = min(base) + t_fwd if base else None
    print(
        f"teacher forward alone: {t_fwd * 1000:.0f} ms"
        + (f"; ideal KD step = student CE step + teacher forward = {ideal * 1000:.0f} ms" if ideal else "")
    )
    print(
        f"{'mode':<22}{'head':>8}{'step ms':>10}{'tokens/s':>10}{'peak RSS MB':>13}"
        + (f"{'ratio':>8}" if ideal else "")
    )
    for (mode, fused), r in results.items():
        head_name = "fused" if r["fused"] else "logits"
        if fused and not r["fused"]:
            head_name = "logits*"  # asked for fused, the engine declined
        row = f"{mode:<22}{head_name:>8}{r['step_s'] * 1000:>10.0f}{r['tok_s']:>10.0f}{r['rss_mb']:>13.0f}"
        print(row + (f"{r['step_s'] / ideal:>8.2f}" if ideal else ""))
    if any(f and not r["fused"] for (_, f), r in results.items()):
        print("logits*: train.fused_head was on but the engine kept the logits (alignkd.engine.load.fused_heads)")


if __name__ == "__main__":
    main()
