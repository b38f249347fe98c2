"""Cost of one real distillation step against a minimal CE loop and a TRL-style step.

The packaged teacher (SmolLM2-135M, found by ``alignkd.assets.prepare`` as the demo
does) is distilled into the demo's student, 6 of its 30 blocks copied from it
(``student.from_teacher``). Every case trains on batches of 4 x 256 tokens of the
packaged corpus (State of the Union), in float32 (``teacher.dtype=float32``,
``train.mixed_precision=no``), in its own process, so peak RSS (``ru_maxrss``) is
per case. The time is the median over ``--steps`` steps after ``--warmup`` steps.

- ``a``: minimal PyTorch loop: ``student(input_ids, labels=input_ids).loss``, backward, AdamW step;
- ``t``: the teacher's forward alone (logits included), under ``inference_mode``;
- ``b`` / ``c`` / ``d``: ``alignkd.engine.setup.setup`` + ``engine.step.optimizer_step`` with
  batches drawn as ``engine.loop`` draws them, i.e. what ``alignkd distill`` runs:
  CE only; forward KL; KL + hidden (standardized) + q/k/v relation on 2 mapped layers;
- ``c-bf16``: forward KL under bf16 autocast (``train.mixed_precision=bf16``), as the demo runs it;
- ``g`` / ``g-bf16``: forward KL + CE (both through the student's head), float32 and
  under bf16 autocast (``train.mixed_precision=bf16``; slow on a CPU without fast bf16);
- ``g-lora`` / ``g-lora-head``: ``g`` with a LoRA student (``student.peft``, rank 16 on every linear layer
  of the blocks; and on ``lm_head``, which then runs in the fused head as base + low-rank update);
- ``e-logits`` / ``e-hidden``: KL, and KL + hidden, trained from a teacher cache that
  ``alignkd cache-teacher CONFIG teacher.cache=DIR`` wrote beforehand (not timed);
  "not available" when the CLI has no such command;
- ``f``: a TRL-style GKD step: full student and teacher logits into TRL's
  ``GKDTrainer.generalized_jsd_loss`` (beta 0.5), backward, AdamW. It runs under
  ``--trl-python`` (a separate venv with trl; default: this interpreter); where trl
  does not import there, the same maths written here is timed instead and labelled so.

    .venv/bin/python -m benchmarks.kd_step [--steps 6] [--warmup 2] [--cases a,t,b,c,d,e,f]
        [--json PATH] [--avx2] [--trl-python /tmp/trlvenv/bin/python]

(from the repository root). A venv for trl that keeps the CPU wheel of torch:

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install -c constraints.txt torch==2.13.0 transformers accelerate trl

Targets (issue 8): (b)/(a) <= 1.05; (c)/((a)+(t)) <= 1.1;
(d)/(c) <= 1.1; (e)/(a) <= 1.15 for each cache variant; tokens/s (c)/(f) >= 1.6 and
peak RSS (c)/(f) <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "a": "minimal PyTorch CE loop",
    "t": "teacher forward alone",
    "b": "alignkd CE",
    "b-unfused": "alignkd CE, logits (train.fused_head false)",
    "c": "alignkd forward KL",
    "c-unfused": "alignkd forward KL, logits (fused_head false)",
    "c-bf16": "alignkd forward KL, bf16 autocast",
    "d": "alignkd KL + hidden + relation, 2 layers",
    "g": "alignkd forward KL + CE",
    "g-bf16": "alignkd forward KL + CE, bf16 autocast",
    "g-lora": "alignkd forward KL + CE, LoRA student (r 16)",
    "g-lora-head": "the same, LoRA on lm_head too",
    "e-logits": "alignkd KL from teacher cache (logits)",
    "e-hidden": "alignkd KL + hidden from teacher cache",
    "e-logits-unfused": "alignkd KL from teacher cache, logits (fused_head false)",
    "f": "TRL-style GKD step (JSD, beta 0.5)",
}
GROUPS = {"e": ["e-logits", "e-hidden"]}  # --cases e runs both cache variants
BATCH, SEQ = 4, 256
PAIRS = [[2, 12], [5, 29]]  # student block -> teacher block, for the demo's layers [0, 6, 12, 18, 24, 29]
KL = {"type": "kl", "kind": "forward", "temperature": 1.0}
HIDDEN = {"type": "hidden", "metric": "standardized", "layers": PAIRS}
LOSSES = {
    "b": [{"type": "ce"}],
    "c": [KL],
    "d": [KL, HIDDEN, {"type": "relation", "of": ["q", "k", "v"], "layers": PAIRS}],
    "g": [KL, {"type": "ce"}],
    "g-bf16": [KL, {"type": "ce"}],
    "e-logits": [KL],
    "e-hidden": [KL, HIDDEN],
}
LOSSES.update({f"{c}-unfused": LOSSES[c] for c in ("b", "c", "e-logits")})
LOSSES["c-bf16"] = LOSSES["c"]
LOSSES["g-lora"] = LOSSES["g-lora-head"] = LOSSES["g"]
# student.peft of the LoRA cases: every linear layer of the blocks (and the head), rank 16.
LORA = {
    "g-lora": {"r": 16, "alpha": 32, "target_modules": ["all-linear"]},
    "g-lora-head": {"r": 16, "alpha": 32, "target_modules": ["all-linear", "lm_head"]},
}
# The CLI without an entry script: works in any venv that has alignkd importable from here.
CLI = "import sys; from alignkd.cli import main; sys.exit(main())"
TARGETS = [  # (label, value from the medians, comparison, bound)
    ("time (b)/(a)", lambda r: r["b"]["s"] / r["a"]["s"], "<=", 1.05),
    ("time (c)/((a)+(t))", lambda r: r["c"]["s"] / (r["a"]["s"] + r["t"]["s"]), "<=", 1.1),
    ("time (d)/(c)", lambda r: r["d"]["s"] / r["c"]["s"], "<=", 1.1),
    ("time (e-logits)/(a)", lambda r: r["e-logits"]["s"] / r["a"]["s"], "<=", 1.15),
    ("time (e-hidden)/(a)", lambda r: r["e-hidden"]["s"] / r["a"]["s"], "<=", 1.15),
    ("tokens/s (c)/(f)", lambda r: r["f"]["s"] / r["c"]["s"], ">=", 1.6),
    ("peak RSS (c)/(f)", lambda r: r["c"]["rss_mb"] / r["f"]["rss_mb"], "<=", 0.5),
    # issue 21: a LoRA student keeps no AdamW state and no weight gradients for its frozen base
    ("peak RSS (g-lora)/(g)", lambda r: r["g-lora"]["rss_mb"] / r["g"]["rss_mb"], "<=", 1.0),
    ("time (g-lora)/(g)", lambda r: r["g-lora"]["s"] / r["g"]["s"], "<=", 1.0),
]


def parse_cases(text: str) -> list[str]:
    """``"a,e,f"`` -> ``["a", "e-logits", "e-hidden", "f"]``, in the order given, without repeats."""
    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in CASES and name not in GROUPS:
            raise argparse.ArgumentTypeError(f"unknown case {name!r}; choose from {', '.join([*CASES, *GROUPS])}")
        out += [c for c in GROUPS.get(name, [name]) if c not in out]
    if not out:
        raise argparse.ArgumentTypeError("name at least one case")
    return out


def run_config(spec: dict, case: str) -> dict:
    """The ``alignkd distill`` config of an alignkd case (and of the prepare step, with case ``b``)."""
    return {
        "teacher": {"path": spec["teacher"], "dtype": "float32"},
        "student": {"from_teacher": {"layers": spec["layers"]}, "peft": LORA.get(case)},
        "data": {"train": spec["corpus"], "seq_len": SEQ, "max_train_tokens": spec["max_train_tokens"]},
        "losses": LOSSES[case],
        "weighting": {"strategy": "static"},
        "train": {
            "steps": spec["warmup"] + spec["steps"],
            "batch_size": BATCH,
            "lr": 1e-4,
            "warmup": 1,
            "mixed_precision": "bf16" if case.endswith("-bf16") else "no",
            "eval_every": 0,
            "eval_batches": 1,
            "progress": False,
            "fused_head": not case.endswith("-unfused"),
            "output_dir": str(Path(spec["work"]) / f"run-{case}"),
            "seed": 0,
        },
    }


# ----------------------------------------------------------------------------- children


def timed(step, spec: dict) -> dict:
    """Run ``step(i)`` for warm-up + timed steps; median time, loss first/last, peak RSS of this process."""
    import resource

    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        losses.append(step(i))  # returns a Python float: the step's work is finished
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    return {
        "s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def prepare_case(spec: dict, case: str) -> dict:
    """Save the student (as ``setup`` builds it) and the packed blocks for the plain-PyTorch cases."""
    import torch

    from alignkd.align.tasks import TASKS
    from alignkd.config import load_config
    from alignkd.models import load_model, load_tokenizer
    from alignkd.models.student import build_student

    cfg = load_config(data=run_config(spec, "b"))
    tok = load_tokenizer(cfg.teacher.path, what="teacher")
    teacher = load_model(cfg.teacher.path, task="causal_lm", dtype="float32", what="teacher")
    build_student(cfg.student, teacher, "causal_lm").save_pretrained(spec["student"])
    train, _ = TASKS["causal_lm"].load_data(cfg, tok)
    torch.save(train["input_ids"], spec["blocks"])
    return {"blocks": list(train["input_ids"].shape)}


def alignkd_case(spec: dict, case: str) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignkd.config import load_config
    from alignkd.engine.loop import next_batches
    from alignkd.engine.setup import setup
    from alignkd.engine.step import optimizer_step

    overrides = [f"teacher.cache={spec['caches'][case]}"] if case.startswith("e-") else []
    cfg = load_config(data=run_config(spec, case), overrides=overrides)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    run = setup(cfg, acc, say=lambda msg: None)

    def step(i: int) -> float:
        r = optimizer_step(run, i, next_batches(run, i))
        if r.bad:
            raise RuntimeError(f"step {i} skipped: non-finite {r.bad}")
        return r.means["loss"]

    return timed(step, spec)


def gjsd_here(student_logits, teacher_logits, labels, beta: float):
    """Generalised JSD, ``beta KL(t || m) + (1 - beta) KL(s || m)`` with ``m = beta t + (1 - beta) s``.

    Our own code, used only where trl does not import. Logits ``[B, T, V]``, labels
    ``[B, T]`` (-100: not counted); the mean over counted positions. ``0 < beta < 1``.
    """
    import math

    import torch

    ls = torch.log_softmax(student_logits.float(), -1)
    lt = torch.log_softmax(teacher_logits.float(), -1)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
    per = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    keep = labels != -100
    return per[keep].sum() / keep.sum().clamp(min=1)


def trl_gjsd():
    """(TRL's generalized_jsd_loss and its label, or our own maths and why) for case f."""
    try:
        import trl

        try:
            from trl import GKDTrainer
        except ImportError:  # newer trl releases keep it here
            from trl.experimental.gkd import GKDTrainer
    except Exception:  # noqa: BLE001 (a trl built for other torch/transformers fails in many ways)
        return gjsd_here, "re-implementation, trl not importable"
    return GKDTrainer.generalized_jsd_loss, f"trl {trl.__version__} generalized_jsd_loss"


def plain_case(spec: dict, case: str) -> dict:
    """Cases a, t, f: transformers and torch only (so f can run in a venv without alignkd's dependencies)."""
    import torch
    from transformers import AutoModelForCausalLM

    blocks = torch.load(spec["blocks"])
    g, note = torch.Generator().manual_seed(0), ""

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    if case == "t":
        teacher = load(spec["teacher"]).eval()

        def step(i: int) -> float:
            ids = blocks[torch.randint(len(blocks), (BATCH,), generator=g)]
            with torch.inference_mode():
                return float(teacher(input_ids=ids).logits[0, -1, 0])

        return {**timed(step, spec), "note": note}
    student = load(spec["student"]).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95))
    if case == "f":
        teacher = load(spec["teacher"]).eval()
        gjsd, note = trl_gjsd()

    def step(i: int) -> float:
        ids = blocks[torch.randint(len(blocks), (BATCH,), generator=g)]
        if case == "a":
            loss = student(input_ids=ids, labels=ids).loss
        else:  # as GKD: logits at t predict token t + 1; nothing is masked in packed blocks
            s = student(input_ids=ids).logits
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            loss = gjsd(s[:, :-1], t[:, :-1], ids[:, 1:], beta=0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return {**timed(step, spec), "note": note}


# ----------------------------------------------------------------------------- parent


def spawn(case: str, spec_path: Path, python: str, env: dict) -> dict:
    """Run one case in its own process; its result, or ``{"note": why it failed}``."""
    out = subprocess.run(
        [python, "-m", "benchmarks.kd_step", "--case", case, "--spec", str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    if out.returncode:
        print(f"[{case}] failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        lines = out.stderr.strip().splitlines()
        return {"note": "failed: " + (lines[-1][:100] if lines else f"exit {out.returncode}")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_cache(spec: dict, case: str, env: dict) -> str | None:
    """Write the teacher cache of a cache case with the CLI; None when done, else why not."""
    import yaml

    probe = subprocess.run(
        [sys.executable, "-c", CLI, "cache-teacher", "--help"], capture_output=True, text=True, env=env, check=False
    )
    if probe.returncode:
        return "not available (no `alignkd cache-teacher`)"
    if Path(spec["caches"][case]).is_dir():  # written for an earlier case (a fused one and its -unfused share it)
        return None
    work = Path(spec["work"])
    cfg = run_config(spec, case)
    (work / f"{case}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "cache-teacher",
            str(work / f"{case}.yaml"),
            f"teacher.cache={spec['caches'][case]}",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        return "not available (cache-teacher failed: " + (lines[-1][:80] if lines else f"exit {out.returncode}") + ")"
    print(f"[{case}] cache written in {time.perf_counter() - t0:.0f} s (not timed)", flush=True)
    return None


def cpu_summary() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU"
    )
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{model}, {os.cpu_count()} cores; {has}"


def table(results: dict) -> list[str]:
    tokens = BATCH * SEQ
    c, w = max(10, *(len(k) + 2 for k in results)), max(44, *(len(CASES[k]) + 2 for k in results))
    rows = [
        f"{'case':<{c}}{'what':<{w}}{'s/step':>8}{'min-max s':>12}{'tokens/s':>10}{'peak RSS MB':>13}  loss first->last"
    ]
    for case, r in results.items():
        if "s" not in r:
            rows.append(f"{case:<{c}}{CASES[case]:<{w}}{'-':>8}{'-':>12}{'-':>10}{'-':>13}  {r['note']}")
            continue
        loss = f"{r['loss_first']:.3f}->{r['loss_last']:.3f}" if case != "t" else "-"
        note = f"  [{r['note']}]" if r.get("note") else ""
        rows.append(
            f"{case:<{c}}{CASES[case]:<{w}}{r['s']:>8.2f}{r['min_s']:>6.2f}-{r['max_s']:<5.2f}"
            f"{tokens / r['s']:>10.0f}{r['rss_mb']:>13.0f}  {loss}{note}"
        )
    return rows


def ratios(results: dict) -> list[dict]:
    out = []
    for label, f, op, bound in TARGETS:
        try:
            value = f(results)
            met = value <= bound if op == "<=" else value >= bound
        except KeyError:  # a case not run or not available
            value = met = None
        out.append({"ratio": label, "value": value, "target": f"{op} {bound}", "met": met})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--cases", type=parse_cases, default=list(CASES), help=f"comma-separated, from {', '.join([*CASES, *GROUPS])}"
    )
    p.add_argument("--json", help="also write the header, results and ratios here")
    p.add_argument(
        "--avx2", action="store_true", help="children run with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
    )
    p.add_argument(
        "--trl-python",
        default=os.environ.get("TRL_PYTHON", sys.executable),
        help="interpreter for case f, e.g. a venv with trl (default: $TRL_PYTHON, else this one)",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        spec = json.loads(Path(args.spec).read_text())
        run = prepare_case if args.case == "prepare" else alignkd_case if args.case in LOSSES else plain_case
        print(json.dumps(run(spec, args.case)))
        return
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    import torch

    from alignkd.assets import prepare
    from alignkd.demo import student_layers

    assets = prepare(only=["teacher", "corpus"], progress=False)
    env = dict(os.environ)
    if args.avx2:
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    header = [
        f"CPU: {cpu_summary()}",
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads"
        + ("; children emulate AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2)" if args.avx2 else ""),
        (
            f"float32; batch {BATCH} x {SEQ} tokens; median of {args.steps} steps after {args.warmup} warm-up; "
            f"load average at start {os.getloadavg()[0]:.2f} (a shared machine: timings are noisy)"
        ),
    ]
    print("\n".join(header), flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kd_step-") as tmp:
        work = Path(tmp)
        spec = {
            "work": tmp,
            "teacher": str(assets.teacher),
            "corpus": str(assets.sotu),
            "layers": student_layers(assets.teacher),
            "steps": args.steps,
            "warmup": args.warmup,
            "student": str(work / "student"),
            "blocks": str(work / "blocks.pt"),
            # enough blocks for every step's batch to be new, plus the held-out split
            "max_train_tokens": SEQ * (BATCH * (args.warmup + args.steps) + 4),
            "caches": {c: str(work / f"cache-{c.removesuffix('-unfused')}") for c in CASES if c.startswith("e-")},
        }
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        if {"a", "t", "f"} & set(args.cases):
            prep = spawn("prepare", spec_path, sys.executable, env)
            if "note" in prep:
                raise SystemExit(f"preparing the student and blocks {prep['note']}")
        for case in args.cases:
            why = build_cache(spec, case, env) if case.startswith("e-") else None
            if why:
                results[case] = {"note": why}
            else:
                results[case] = spawn(case, spec_path, args.trl_python if case == "f" else sys.executable, env)
            print(f"[{case}] {results[case].get('s', '-')} s/step", flush=True)
    print("\n".join(table(results)))
    rs = ratios(results)
    print(f"\n{'ratio (medians)':<24}{'value':>8}  {'target':<8}")
    for r in rs:
        value = f"{r['value']:.2f}" if r["value"] is not None else "-"
        met = {True: "met", False: "MISSED", None: "n/a"}[r["met"]]
        print(f"{r['ratio']:<24}{value:>8}  {r['target']:<8}  {met}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results, "ratios": rs}, indent=2))


if __name__ == "__main__":
    main()
