"""Where the memory of a 262k-vocabulary distillation goes, and what ``student.freeze`` and Adafactor save.

The teacher has Gemma-3-270M's shape: 262,144 tokens, 18 blocks 640 wide, a tied
embedding. It is randomly initialised from its config (no weights are
downloaded), in bfloat16. The student copies 6 of its blocks
(``student.from_teacher``), so 168M of its 201M parameters are the embedding it
shares with its head. Each case trains forward KL on batches of 8 x 128 tokens
under ``train.mixed_precision: auto`` (bf16 autocast where bf16 is fast), as a
user's run would, in a process of its own:

- ``adamw``: every parameter trained by AdamW (the default);
- ``freeze``: ``student.freeze: [model.embed_tokens]``: the embedding, and the
  head tied to it, are not trained;
- ``adafactor``: every parameter trained, by ``train.optimizer: adafactor``.

Each case prints what its tensors hold after its last step: the weights (the
student's by group, the teacher's), the gradients (as large as the trained
weights, held from each backward to its optimizer step) and the optimizer
state, all counted from the tensors themselves. Then it prints the process's
resident memory after set-up, its peak over training, and its peak after one
held-out evaluation (``train.eval_batches`` of 8 x 128 tokens, which makes
whole ``[8, 128, 262144]`` logits). What the peak holds
beyond the tensors counted is activations, the loss chunks, the allocator's
caches and the Python process itself.

    .venv/bin/python -m benchmarks.large_vocab [--steps 3] [--cases adamw,freeze,adafactor] [--json PATH]
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

CASES = {
    "adamw": ("AdamW, everything trained", {}),
    "freeze": ("AdamW, embedding (and tied head) frozen", {"student": {"freeze": ["model.embed_tokens"]}}),
    "adafactor": ("Adafactor, everything trained", {"train": {"optimizer": "adafactor", "lr": 1e-2}}),
}
BATCH, SEQ = 8, 128
LAYERS = [0, 3, 7, 10, 14, 17]
MB = 1024 * 1024


def build_teacher(folder: Path) -> None:
    """Gemma-3-270M's shape, random weights in bfloat16, with the byte tokenizer of ``alignkd.testing``."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from alignkd.testing import byte_tokenizer

    cfg = Gemma3TextConfig(
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def run_config(work: Path, teacher: Path, corpus: Path, case: str, steps: int) -> dict:
    cfg = {
        "teacher": {"path": str(teacher), "dtype": "auto"},
        "student": {"from_teacher": {"layers": LAYERS}},
        "data": {"train": str(corpus), "seq_len": SEQ},
        "losses": [{"type": "kl", "kind": "forward", "temperature": 1.0}],
        "weighting": {"strategy": "static"},
        "train": {
            "steps": steps,
            "batch_size": BATCH,
            "lr": 1e-4,
            "warmup": 1,
            "mixed_precision": "auto",
            "eval_every": 0,
            "eval_batches": 2,
            "progress": False,
            "output_dir": str(work / f"run-{case}"),
            "seed": 0,
        },
    }
    for section, values in CASES[case][1].items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, from /proc (MB)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _bytes(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / MB


def child(spec: dict) -> dict:
    """One case: set up, train, and count what the tensors hold."""
    import torch
    from accelerate.utils import set_seed

    from alignkd.backend.launch import make_accelerator
    from alignkd.config import load_config, resolve_precision
    from alignkd.engine.loop import next_batches
    from alignkd.engine.setup import setup
    from alignkd.engine.step import optimizer_step
    from alignkd.precision import default_device

    cfg = load_config(data=spec["config"])
    resolve_precision(cfg, default_device())  # auto: bf16 where it is fast here, as alignkd distill resolves it
    acc = make_accelerator(cfg.train.mixed_precision)
    set_seed(0)
    run = setup(cfg, acc, say=lambda msg: None)
    after_setup, _ = _rss_mb()
    times = []
    for i in range(spec["steps"]):
        t0 = time.perf_counter()
        r = optimizer_step(run, i, next_batches(run, i))
        if r.bad:
            raise RuntimeError(f"step {i} skipped: non-finite {r.bad}")
        times.append(time.perf_counter() - t0)
    _, peak = _rss_mb()
    student = run.unwrapped.student
    t0 = time.perf_counter()
    run.evaluate(student)  # one held-out evaluation (train.eval_batches of 8 x 128 tokens): its logits are whole
    eval_s = time.perf_counter() - t0
    _, eval_peak = _rss_mb()
    emb = student.get_input_embeddings().weight
    params = list(student.parameters())
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # the torch optimizer inside Accelerate's wrapper
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    emb_state = [v for v in optimizer.state.get(emb, {}).values() if torch.is_tensor(v)]
    return {
        "precision": f"{cfg.teacher.dtype} teacher, autocast {cfg.train.mixed_precision}",
        "student_params_m": sum(p.numel() for p in params) / 1e6,
        "student_weights_mb": _bytes(params),
        "embedding_mb": _bytes([emb]),
        "teacher_weights_mb": _bytes(run.teacher.model.parameters()),
        # A step's gradients live from its backward to the optimizer's step, then are freed: one per trained value.
        "grads_mb": _bytes(p for p in params if p.requires_grad),
        "optimizer_mb": _bytes(state),
        "optimizer_embedding_mb": _bytes(emb_state),
        "rss_after_setup_mb": after_setup,
        "peak_rss_mb": peak,
        "eval_peak_rss_mb": eval_peak,
        "eval_s": eval_s,
        "s_per_step": statistics.median(times[1:] or times),
        "tokens_per_s": BATCH * SEQ / statistics.median(times[1:] or times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first is not timed)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    from alignkd.assets import prepare

    corpus = prepare(only=["corpus"], progress=False).sotu
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_teacher(work / "teacher")
        for case in cases:
            spec = {"config": run_config(work, work / "teacher", corpus, case, args.steps), "steps": args.steps}
            (work / f"{case}.json").write_text(json.dumps(spec))
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.large_vocab", "--child", str(work / f"{case}.json")],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    _print(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _print(results: dict) -> None:
    rows = [
        ("student parameters (M)", "student_params_m", "{:.1f}"),
        ("student weights, float32 (MB)", "student_weights_mb", "{:.0f}"),
        ("  of them the embedding (tied head)", "embedding_mb", "{:.0f}"),
        ("teacher weights (MB)", "teacher_weights_mb", "{:.0f}"),
        ("gradients, from backward to step (MB)", "grads_mb", "{:.0f}"),
        ("optimizer state (MB)", "optimizer_mb", "{:.0f}"),
        ("  of it the embedding's", "optimizer_embedding_mb", "{:.1f}"),
        ("RSS after set-up (MB)", "rss_after_setup_mb", "{:.0f}"),
        ("peak RSS over training (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak RSS after one evaluation (MB)", "eval_peak_rss_mb", "{:.0f}"),
        ("s / step (median)", "s_per_step", "{:.2f}"),
        ("tokens / s", "tokens_per_s", "{:.0f}"),
    ]
    cases = list(results)
    print("| | " + " | ".join(f"{c}: {CASES[c][0]}" for c in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(results[c][key]) for c in cases) + " |")
    print(f"precision: {results[cases[0]]['precision']}")


if __name__ == "__main__":
    main()
