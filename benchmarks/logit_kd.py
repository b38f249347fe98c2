"""Logit distillation from the LM heads: ``lm_head_kl`` against the materialised logits.

Three ways to get the same loss and its gradients w.r.t. the student's final hidden
states and head, from hidden states ``[tokens, D]`` and heads ``[V, D]`` of both models
(float32, random, 10 % of the positions masked out):

- ``lm_head_kl``: the fused, token-chunked loss (neither model's logits exist);
- ``kl_div``: ``h @ W.T`` for both models (the teacher's under ``no_grad``), then
  ``kl_div`` on the full float32 logits and ``backward``;
- ``trl``: the same full logits into TRL's ``GKDTrainer.generalized_jsd_loss``
  (beta 0 / 0.5 / 1 for forward / jsd / reverse), when ``trl`` imports
  (``pip install -e .[bench]``); otherwise the column is left out with a note.

    .venv/bin/python -m benchmarks.logit_kd [--quick] [--kind forward] [--repeats N] [--device cpu] [--autocast bf16]

(from the repository root). Each case runs in its own process. Peak memory is
what one forward + backward adds on top of the inputs: on CUDA
``torch.cuda.max_memory_allocated()`` minus the memory allocated after the inputs
were built; on CPU the process's peak resident set (``ru_maxrss``) after one
forward + backward minus its value once the inputs were built. Both include the
gradients the step leaves behind (``[tokens, D]`` and ``[V, D]`` for the student);
the CPU figure also counts allocator slack, so compare within a column's device.
On Linux the CPU peak is reset just before the step (``/proc/self/clear_refs``) and
read from ``VmHWM``, so transients of building the inputs do not hide part of it;
elsewhere it falls back to ``ru_maxrss``. glibc keeps freed chunk temporaries
(below its mmap threshold, up to 32 MB) in its heap, so the resident peak also
holds memory no tensor uses any more; ``MALLOC_MMAP_THRESHOLD_=1048576`` makes
glibc return them, and the peak then follows the live tensors (at some speed cost).
The time is the median of ``--repeats`` further forward + backward passes (gradients
cleared in between). ``--autocast bf16`` (or fp16) runs every method as a training step
under mixed precision does: student hidden states and head in float32 under autocast,
the teacher's hidden states and head in bf16 (a teacher loaded in bf16, outside
autocast). A case whose full logits would not fit in the memory available is
skipped (``-``).

Targets (issue 8), read off the full table: at 8k tokens lm_head_kl's peak memory is
at most 1/8 of kl_div's and its time no worse; from 1k to 16k tokens its memory grows
by at most 10 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys

METHODS = ("lm_head_kl", "kl_div", "trl")
TRL_BETA = {"forward": 0.0, "jsd": 0.5, "reverse": 1.0}  # TRL's generalized JSD at these betas


def trl_loss():
    """TRL's generalized JSD loss, or None when trl does not import."""
    try:
        from trl import GKDTrainer
    except Exception:
        try:
            from trl.experimental.gkd import GKDTrainer
        except Exception:
            return None
    return GKDTrainer.generalized_jsd_loss


def run_case(
    method: str, tokens: int, vocab: int, width: int, kind: str, repeats: int, device: str, autocast: str = "none"
) -> dict:
    """One case in this process: peak memory of the first forward + backward, median time of the rest."""
    import resource
    import time

    import torch

    from alignkd.losses import kl_div, lm_head_kl

    cuda = device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(tokens, width, generator=g).to(device).requires_grad_(True)
    ws = (torch.randn(vocab, width, generator=g) * 3 / width**0.5).to(device).requires_grad_(True)
    low = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    ht = torch.randn(tokens, width, generator=g).to(device, low or torch.float32)
    wt = (torch.randn(vocab, width, generator=g) * 3 / width**0.5).to(device, low or torch.float32)
    mask = (torch.rand(tokens, generator=g) < 0.9).to(device)
    gjsd = trl_loss() if method == "trl" else None

    def step() -> float:
        hs.grad = ws.grad = None
        with torch.autocast(device.split(":")[0], dtype=low or torch.bfloat16, enabled=low is not None):
            if method == "lm_head_kl":
                loss = lm_head_kl(hs, ws, ht, wt, mask, kind=kind)
            else:
                zs = hs @ ws.T
                with torch.no_grad():
                    zt = ht @ wt.T
                if method == "kl_div":
                    loss = kl_div(zs, zt, mask, kind=kind)
                else:  # TRL masks with labels == -100 and averages over the counted tokens
                    labels = torch.where(mask, 0, -100)
                    loss = gjsd(
                        zs[None].float(), zt[None].float(), labels[None], beta=TRL_BETA[kind], reduction="batchmean"
                    )
        loss.backward()
        return loss.item()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif reset_peak_rss():  # Linux: the peak from here on, over the resident set now
        base = proc_status_bytes("VmRSS")
    else:  # the process's high-water mark so far (building the inputs may have set it higher than now)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = step()
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (
            proc_status_bytes("VmHWM")
            if proc_status_bytes("VmHWM")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"peak_mb": (peak - base) / 2**20, "ms": statistics.median(times) * 1000, "loss": value}


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0: ``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` size (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def full_logits_bytes(tokens: int, vocab: int) -> int:
    # student logits, teacher logits, kl_div's gradient buffer and its scaled copy
    return 4 * tokens * vocab * 4


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        import psutil
    except ImportError:
        return 1 << 62
    return psutil.virtual_memory().available


def spawn(method: str, tokens: int, vocab: int, width: int, args) -> dict | None:
    if method != "lm_head_kl" and full_logits_bytes(tokens, vocab) > 0.8 * available_bytes(args.device):
        return None
    case = json.dumps([method, tokens, vocab, width, args.kind, args.repeats, args.device, args.autocast])
    out = subprocess.run([sys.executable, "-m", "benchmarks.logit_kd", "--case", case], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} at {tokens} tokens, V={vocab}, D={width} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1k and 4k tokens, V=49152, D=576 only")
    p.add_argument(
        "--kind", default="forward", help="divergence of lm_head_kl and kl_div (TRL: forward, jsd or reverse)"
    )
    p.add_argument(
        "--repeats", type=int, help="timed passes after the first (the memory one); default 3, 2 with --quick"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--autocast",
        default="none",
        choices=["none", "bf16", "fp16"],
        help="run the step under this autocast (teacher tensors in that dtype)",
    )
    p.add_argument("--tokens", help="comma-separated token counts (default 1024,4096,8192,16384)")
    p.add_argument("--vocab", type=int, help="only the shape with this vocabulary (49152 or 151936)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return
    args.repeats = args.repeats or (2 if args.quick else 3)

    import torch

    tokens = (1024, 4096) if args.quick else (1024, 4096, 8192, 16384)
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else tokens
    shapes = ((49152, 576),) if args.quick else ((49152, 576), (151936, 896))
    shapes = tuple(s for s in shapes if args.vocab in (None, s[0]))
    methods = ["lm_head_kl", "kl_div"]
    if trl_loss() is None:
        print("note: trl does not import here (pip install -e .[bench]); its column is left out")
    elif args.kind not in TRL_BETA:
        print(f"note: TRL's generalized JSD has no {args.kind!r}; its column is left out")
    else:
        methods.append("trl")
    threads = f"{torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    precision = "float32" if args.autocast == "none" else f"{args.autocast} autocast, teacher {args.autocast}"
    print(
        f"torch {torch.__version__}, {threads}; kind {args.kind}; {precision}; "
        f"median of {args.repeats} forward+backward"
    )
    head = f"{'tokens':>7}{'V':>8}{'D':>5}" + "".join(f"{m + ' MB':>15}{m + ' ms':>15}" for m in methods)
    print(head + f"{'mem ratio':>11}{'time ratio':>11}")
    for vocab, width in shapes:
        for n in tokens:
            res = {m: spawn(m, n, vocab, width, args) for m in methods}
            row = f"{n:>7}{vocab:>8}{width:>5}"
            for m in methods:
                r = res[m]
                row += f"{r['peak_mb']:>15.0f}{r['ms']:>15.0f}" if r else f"{'-':>15}{'-':>15}"
            fused, full = res["lm_head_kl"], res["kl_div"]
            if full:  # lm_head_kl / kl_div; the losses must agree
                row += f"{fused['peak_mb'] / full['peak_mb']:>11.3f}{fused['ms'] / full['ms']:>11.2f}"
                for m in methods[1:]:
                    if res[m] and abs(res[m]["loss"] - fused["loss"]) > 1e-4 * max(abs(fused["loss"]), 1.0):
                        row += f"  ({m} loss {res[m]['loss']:.6g} != {fused['loss']:.6g})"
            print(row, flush=True)


if __name__ == "__main__":
    main()
