"""alignkd's sampler (``alignkd.models.generate.generate``, what on-policy and sequence-level runs call) against
Hugging Face ``model.generate`` with the same settings.

The model is the packaged teacher (SmolLM2-135M, from ``alignkd assets``) or, with
``--random`` or where it is not prepared, a randomly initialised llama of its shape.
Each case continues ``--batch`` prompts of ``--prompt`` random token ids by
exactly ``--new`` tokens: EOS is ignored on
both sides (``min_new_tokens`` for ``model.generate``), so both make the same
number of tokens. Cases: greedy, and sampling at temperature 1 with top-p 0.95.
Each timing is the median of ``--repeats`` runs after one warm-up, in this process,
the two sides interleaved.

    .venv/bin/python -m benchmarks.generate [--batch 8] [--prompt 32] [--new 64] [--repeats 5]
        [--dtype float32|bfloat16] [--random]

Target (issue 19): alignkd's tokens/s at least 0.9x ``model.generate``'s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from alignkd.models.generate import Sampling, generate

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def _model(random: bool, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not random:
        try:
            from alignkd.assets import prepare

            assets = prepare(only=["teacher"], progress=False)
            model = AutoModelForCausalLM.from_pretrained(assets.teacher, dtype=dtype)
            return model.eval(), f"packaged teacher ({assets.teacher.name})"
        except Exception as e:  # not prepared here: the same shape, random weights
            print(f"packaged teacher not available ({e}); using a random llama of its shape")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=dtype).eval(), "random SmolLM2-135M"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--random", action="store_true", help="a random model of SmolLM2-135M's shape")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model, what = _model(args.random, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    print(
        f"{what}, {args.dtype}, batch {args.batch} x prompt {args.prompt} + {args.new} new tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    rows = []
    for name, sampling in (
        ("greedy", Sampling(args.new, temperature=0.0)),
        ("sample t=1 top_p=0.95", Sampling(args.new, temperature=1.0, top_p=0.95)),
    ):

        def ours(sampling=sampling):
            generate(model, ids, mask, sampling, list(range(args.batch)), eos_ids=[], pad_id=0)

        def theirs(sampling=sampling):
            kw = (
                {"do_sample": False}
                if sampling.temperature == 0
                else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
            )
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=mask.long(),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    pad_token_id=0,
                    **kw,
                )

        a, b = _time(ours, args.repeats), _time(theirs, args.repeats)
        tokens = args.batch * args.new
        rows.append((name, tokens / a, tokens / b, b / a))
    print("\n| case | alignkd tokens/s | model.generate tokens/s | alignkd / model.generate |")
    print("|---|---|---|---|")
    for name, ours_tps, theirs_tps, ratio in rows:
        print(f"| {name} | {ours_tps:,.0f} | {theirs_tps:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
