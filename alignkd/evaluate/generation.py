"""Greedy continuations of held-out passages, and BLEU/ROUGE/CER against references."""

from __future__ import annotations

import statistics

import torch

from alignkd.data import wants_bos
from alignkd.errors import EvalError
from alignkd.evaluate.loading import device_of
from alignkd.evaluate.settings import Step

PROMPT_TOKENS = 64  # tokens of held-out text each generation prompt holds
GENERATION_BATCH = 16  # prompts generated together; all have the same length, so no padding


def passages(ids: torch.Tensor, count: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` evenly spaced passages of a token stream ``[N]``: prompts ``[count, PROMPT_TOKENS]``, references
    ``[count, new_tokens]``."""
    span = PROMPT_TOKENS + new_tokens
    n = ids.numel()
    if n < span:
        raise EvalError(
            f"the held-out text has {n} tokens; generation needs at least {span} "
            f"({PROMPT_TOKENS} prompt + {new_tokens} new)"
        )
    starts = [round(i * (n - span) / max(count - 1, 1)) for i in range(count)]
    rows = torch.stack([ids[s : s + span] for s in starts])
    return rows[:, :PROMPT_TOKENS], rows[:, PROMPT_TOKENS:]


def generation_config(model, new_tokens: int, *, exact: bool = False):
    from transformers import GenerationConfig

    # A fresh config: a checkpoint's sampling settings (temperature, top_p) must not apply.
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    pad = model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )


@torch.inference_mode()
def continuations(
    model, tokenizer, prompts: torch.Tensor, new_tokens: int, on_step: Step | None = None, *, ids: bool = False
):
    """Greedy continuations of ``prompts`` ``[P, T]`` (``new_tokens`` at most, EOS ends one early), decoded; with
    ``ids``, ``(texts, id lists)`` (the ids up to and with the EOS).

    A tokenizer that adds BOS gets it before each prompt, as its model expects.
    """
    config = generation_config(model, new_tokens)
    if wants_bos(tokenizer):
        prompts = torch.cat([torch.full_like(prompts[:, :1], tokenizer.bos_token_id), prompts], dim=1)
    texts: list[str] = []
    id_lists: list[list[int]] = []
    eos = config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    for start in range(0, len(prompts), GENERATION_BATCH):
        x = prompts[start : start + GENERATION_BATCH].to(device_of(model))
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        texts += tokenizer.batch_decode(out[:, x.shape[1] :], skip_special_tokens=True)
        for row in out[:, x.shape[1] :].tolist():  # up to the first EOS (padding follows it)
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            id_lists.append(row[:end])
        if on_step:
            on_step(len(texts), len(prompts))
    return (texts, id_lists) if ids else texts


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """BLEU (sacrebleu, 0-100), mean ROUGE-1/2/L F1 (rouge_score) and CER (jiwer) of predictions vs references."""
    import jiwer
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise EvalError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    out = {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = statistics.fmean(s[key].fmeasure for s in rouge)
    out["cer"] = float(jiwer.cer(reference=references, hypothesis=predictions))
    return out


SAMPLE_SEED = 1234
"""Seed of the sampled continuations (one per prompt: prompt ``i`` draws with ``SAMPLE_SEED + i``)."""


@torch.inference_mode()
def sampled(model, tokenizer, prompts: torch.Tensor, new_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Continuations of ``prompts`` ``[P, T]`` sampled at temperature 1 (EOS ends one early), as the prompts
    (BOS first where the tokenizer adds one) and the sampled ids, ``[n]`` each, on the CPU."""
    from alignkd.models.generate import Sampling, generate

    if wants_bos(tokenizer):
        prompts = torch.cat([torch.full_like(prompts[:, :1], tokenizer.bos_token_id), prompts], dim=1)
    config = generation_config(model, new_tokens)
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    heads, tails = [], []
    for start in range(0, len(prompts), GENERATION_BATCH):
        x = prompts[start : start + GENERATION_BATCH].to(device_of(model))
        seeds = [SAMPLE_SEED + start + i for i in range(len(x))]
        gen = generate(
            model,
            x,
            torch.ones_like(x, dtype=torch.bool),
            Sampling(new_tokens),
            seeds,
            eos_ids=eos,
            pad_id=config.pad_token_id or 0,
            vocab=len(tokenizer),
        )
        for i in range(len(x)):
            heads.append(x[i].cpu())
            tails.append(gen.input_ids[i][gen.generated[i]].cpu())
    return heads, tails
