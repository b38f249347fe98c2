"""What a model costs: prefill and decode latency, parameter count, size on disk."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from alignkd.evaluate.generation import generation_config
from alignkd.evaluate.loading import accepts, check_context, device_of, is_classifier
from alignkd.models.student import param_count


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def latency(model, *, batch: int, length: int, new_tokens: int, repeats: int = 5, warmup: int = 2) -> dict:
    """Prefill and decode cost per token on the model's device, from medians of ``repeats`` runs.

    Prefill: one forward of a random ``[batch, length]`` prompt that builds the
    KV cache and the last logits (as generation does), per prompt token.
    Decode: ``generate`` of exactly ``new_tokens`` greedy tokens minus
    ``generate`` of one (which is the prefill plus generate's own set-up), per
    token after the first. A classifier has no decode; it reports prefill only.
    """
    device = device_of(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)
    out = {}
    if is_classifier(model):
        prefill = _timed(lambda: model(input_ids=ids), device, repeats, warmup)
    else:
        check_context(
            model, length + new_tokens, "the latency prompt and its new tokens", "use a shorter --latency-len"
        )
        extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        prefill = _timed(lambda: model(ids, use_cache=True, **extra), device, repeats, warmup)
    out["prefill_ms_per_token"] = 1000 * prefill / (batch * length)
    if not is_classifier(model) and new_tokens > 1:
        mask = torch.ones_like(ids)

        def generate(n: int) -> float:
            config = generation_config(model, n, exact=True)
            return _timed(
                lambda: model.generate(ids, attention_mask=mask, generation_config=config), device, repeats, warmup
            )

        # Both runs share the prefill and the set-up, so their difference is the decode steps alone.
        steps = generate(new_tokens) - generate(1)
        out["decode_ms_per_token"] = 1000 * max(steps, 0.0) / (batch * (new_tokens - 1))
    for kind in ("prefill", "decode"):
        ms = out.get(f"{kind}_ms_per_token")
        if ms is not None:
            out[f"{kind}_tokens_per_s"] = 1000 / ms if ms > 0 else None
    return out


def param_counts(model) -> dict:
    """``params`` (tied weights once) and ``non_embedding_params``: less the input embedding and an untied output
    head."""
    total = param_count(model)
    emb = model.get_input_embeddings().weight
    non_emb = total - emb.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb:
        non_emb -= head.weight.numel()
    return {"params": total, "non_embedding_params": non_emb}


def size_on_disk(path: str | Path) -> float | None:
    """MiB of the weight files (*.safetensors, *.bin) in a model folder; None when ``path`` is no folder (a hub id)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in files) / 2**20
