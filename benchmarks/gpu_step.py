"""Throughput of a distillation step on a GPU: randomly initialised llama models, bf16, SDPA, and the step's MFU.

The teacher (``--size 1.5b-0.5b``: 24 blocks of width 2048, 1.59B parameters) and
the student (28 blocks of width 1024, 0.49B) are llama models with random weights
and a 32,000-token word-level vocabulary, written to a temporary folder with a
corpus of random words, so nothing is downloaded. Each case runs in its own
process on batches of ``--batch`` x ``--seq`` tokens:

- ``a``: a minimal PyTorch loop: the student's ``labels`` loss under bf16 autocast, AdamW;
- ``c``: ``alignkd.engine.setup.setup`` + ``engine.step.optimizer_step`` (what ``alignkd
  distill`` runs) with forward KL, teacher in bf16, the fused LM-head loss;
- ``d``: the same with KL + hidden (standardized, through learned projectors) + q/k/v
  relation on 2 mapped layers.

MFU = (6 N_student + 2 N_teacher) x tokens / step time / peak bf16 FLOP/s, with N
the parameters that multiply (the input embedding does not: it is left out);
``a`` counts the student only. The peak comes from the device's name (H100 / H200
SXM: 989 TFLOP/s dense bf16) or ``--peak-tflops``; unknown (a CPU) leaves MFU
blank. Attention FLOPs are left out, as the formula does. alignkd has no
``torch.compile`` option yet, so nothing here is compiled.

    python -m benchmarks.gpu_step [--size 1.5b-0.5b] [--cases a,c,d] [--steps 10] [--warmup 3]
    python -m benchmarks.gpu_step --launch fsdp          # the alignkd cases as a 1-process FSDP launch
    python -m benchmarks.gpu_step --size tiny --device cpu --steps 1 --warmup 0   # a smoke run

(from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (teacher llama config, student overrides of it): about 1.5B and 0.5B parameters; a tiny pair for CPU smoke runs.
SIZES = {
    "1.5b-0.5b": (
        {
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
        },
        {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
        },
    ),
    "tiny": (
        {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ),
}
CASES = {
    "a": "minimal PyTorch CE loop (student alone)",
    "c": "alignkd forward KL",
    "d": "alignkd KL + hidden + relation, 2 layers",
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM parts


def losses(case: str, student_layers: int, teacher_layers: int) -> list[dict]:
    kl = {"type": "kl", "kind": "forward"}
    if case == "c":
        return [kl]
    pairs = [[student_layers // 2 - 1, teacher_layers // 2 - 1], [student_layers - 1, teacher_layers - 1]]
    return [
        kl,
        {"type": "hidden", "metric": "standardized", "layers": pairs},
        {"type": "relation", "of": ["q", "k", "v"], "layers": pairs},
    ]


def run_config(spec: dict, case: str) -> dict:
    t_cfg, s_over = SIZES[spec["size"]]
    return {
        "teacher": {"path": spec["teacher"], "dtype": spec["dtype"]},
        "student": {"config": s_over},
        "data": {"train": spec["corpus"], "seq_len": spec["seq"]},
        "losses": losses(case, s_over["num_hidden_layers"], t_cfg["num_hidden_layers"]),
        "weighting": {"strategy": "static"},
        "train": {
            "steps": spec["warmup"] + spec["steps"],
            "batch_size": spec["batch"],
            "lr": 1e-4,
            "warmup": 1,
            "mixed_precision": spec["autocast"],
            "eval_every": 0,
            "eval_batches": 1,
            "progress": False,
            "output_dir": str(Path(spec["work"]) / f"run-{case}"),
            "seed": 0,
        },
    }


# ----------------------------------------------------------------------------- preparation


def word_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` ids: ``w3 w4 ...`` split on spaces; 0-2 are unk, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def prepare(spec: dict) -> dict:
    """Write the random teacher, its tokenizer and a corpus of random words; return their parameter counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t_cfg, s_over = SIZES[spec["size"]]
    device = torch.device(spec["device"])
    config = LlamaConfig(**t_cfg, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        teacher = LlamaForCausalLM(config).to(torch.bfloat16)
    teacher.save_pretrained(spec["teacher"])
    word_tokenizer(t_cfg["vocab_size"]).save_pretrained(spec["teacher"])
    counts = {"teacher": matmul_params(teacher), "student": student_params(t_cfg, s_over)}
    rng = random.Random(0)
    words = (
        spec["seq"] * spec["batch"] * (spec["warmup"] + spec["steps"] + 8)
    )  # every step a new batch, plus a held-out share
    with open(spec["corpus"], "w") as f:
        for start in range(0, words, 1000):
            f.write(
                " ".join(f"w{rng.randrange(3, t_cfg['vocab_size'])}" for _ in range(min(1000, words - start))) + "\n"
            )
    return counts


def matmul_params(model) -> int:
    """Parameters that multiply activations: all but the input embedding (a lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def student_params(t_cfg: dict, s_over: dict) -> int:
    """``matmul_params`` of the student, from its config (building 0.5B random weights on the CPU takes minutes)."""
    c = {**t_cfg, **s_over}
    d, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = d // heads
    attn = d * d * 2 + 2 * d * kv * head_dim
    block = attn + 3 * d * c["intermediate_size"] + 2 * d
    return c["num_hidden_layers"] * block + d + c["vocab_size"] * d


# ----------------------------------------------------------------------------- children


def timed(step, spec: dict, sync) -> dict:
    times, values = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        values.append(step(i))
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    return {
        "s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "loss_first": values[0],
        "loss_last": values[-1],
    }


def case_main(spec: dict, case: str) -> dict:
    import torch

    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if case == "a":
        result = plain_case(spec, sync)
    else:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from alignkd.config import load_config
        from alignkd.engine.loop import next_batches
        from alignkd.engine.setup import setup
        from alignkd.engine.step import optimizer_step

        cfg = load_config(data=run_config(spec, case))
        acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not cuda)
        set_seed(0)
        run = setup(cfg, acc, say=lambda msg: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = timed(lambda i: optimizer_step(run, i, next_batches(run, i)).means["loss"], spec, sync)
        result["note"] = "student sharded (FSDP2)" if run.backend.layout == "sharded_over" else ""
    result["gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return result


def plain_case(spec: dict, sync) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    t_cfg, s_over = SIZES[spec["size"]]
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with device:
        student = AutoModelForCausalLM.from_config(
            LlamaConfig(**{**t_cfg, **s_over}, tie_word_embeddings=False), attn_implementation="sdpa"
        )
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["autocast"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        ids = torch.randint(3, t_cfg["vocab_size"], (spec["batch"], spec["seq"]), generator=g).to(device)
        with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            loss = student(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return timed(step, spec, sync)


# ----------------------------------------------------------------------------- parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_flops(device: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if not device.startswith("cuda"):
        return None, "unknown on a CPU"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s ({name})"
    return None, f"unknown for {name}: pass --peak-tflops"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1.5b-0.5b", choices=list(SIZES))
    p.add_argument("--cases", default="a,c,d", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--autocast", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--dtype", default="bfloat16", help="teacher.dtype")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, where its name is not known here")
    p.add_argument(
        "--launch",
        default="none",
        choices=["none", "fsdp"],
        help="fsdp: each alignkd case runs as a 1-process FSDP launch would (the student's blocks sharded with FSDP2)",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case_main(json.loads(Path(args.spec).read_text()), args.case)))
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set(CASES):
        p.error(f"--cases: choose from {', '.join(CASES)}")
    peak, peak_note = peak_flops(args.device, args.peak_tflops)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if (
        args.launch == "fsdp"
    ):  # what `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1` sets
        env.update(
            ACCELERATE_USE_FSDP="true",
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    with tempfile.TemporaryDirectory(prefix="alignkd-gpu-step-") as tmp:
        spec = {
            **vars(args),
            "work": tmp,
            "teacher": str(Path(tmp) / "teacher"),
            "corpus": str(Path(tmp) / "corpus.txt"),
        }
        t0 = time.perf_counter()
        counts = prepare(spec)
        print(
            f"random teacher {counts['teacher'] / 1e9:.2f}B and student {counts['student'] / 1e9:.2f}B "
            f"multiplying parameters; written in {time.perf_counter() - t0:.0f} s (not timed)",
            flush=True,
        )
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        results = {}
        for case in cases:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.gpu_step", "--case", case, "--spec", str(Path(tmp) / "spec.json")],
                capture_output=True,
                text=True,
                env=env,
                cwd=root,
                check=False,
            )
            if out.returncode:
                print(f"[{case}] failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                results[case] = {
                    "note": "failed: " + (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:100]
                }
            else:
                results[case] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"[{case}] {results[case].get('s', '-')} s/step", flush=True)
    tokens = args.batch * args.seq
    print(
        f"\n{args.size}, batch {args.batch} x {args.seq} tokens, autocast {args.autocast}, teacher {args.dtype}, "
        f"device {args.device}, launch {args.launch}; "
        f"median of {args.steps} steps after {args.warmup}; peak {peak_note}"
    )
    print(f"{'case':<6}{'what':<44}{'s/step':>8}{'tokens/s':>10}{'GPU GB':>8}{'MFU':>7}  loss first->last")
    for case, r in results.items():
        if "s" not in r:
            print(f"{case:<6}{CASES[case]:<44}{'-':>8}{'-':>10}{'-':>8}{'-':>7}  {r['note']}")
            continue
        flops = (6 * counts["student"] + (0 if case == "a" else 2 * counts["teacher"])) * tokens
        r["mfu"] = flops / r["s"] / peak if peak else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        gb = f"{r['gpu_gb']:.1f}" if r.get("gpu_gb") is not None else "-"
        note = f"  [{r['note']}]" if r.get("note") else ""
        print(
            f"{case:<6}{CASES[case]:<44}{r['s']:>8.3f}{tokens / r['s']:>10.0f}{gb:>8}{mfu:>7}  "
            f"{r['loss_first']:.3f}->{r['loss_last']:.3f}{note}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "params": counts, "peak": peak, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
