"""Sampling continuations from a causal LM: batched, with a KV cache, left-padded prompts, stop at EOS.

Each row draws from its own seeded ``torch.Generator``, so a row's continuation
depends on its prompt and seed, not on which rows share its batch: a run
split over processes samples what one process would, and a stored sample can be
made again from its seed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn."""

    max_new_tokens: int
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches ``top_p``."""


@dataclass
class Generated:
    """Prompts and their continuations, one row each, left-aligned: real tokens first, then padding."""

    input_ids: torch.Tensor
    """``[B, L]`` prompt then continuation (padding after them is ``pad_id``)."""
    mask: torch.Tensor
    """``[B, L]`` bool: real tokens (the prompt, the continuation, its EOS)."""
    generated: torch.Tensor
    """``[B, L]`` bool: positions holding a sampled token."""
    top: TopK | None = None
    """The sampling model's top-k log-probabilities at the scored positions (``generate(top_k=...)``); None: not
    kept."""

    @property
    def new_tokens(self) -> int:
        return int(self.generated.sum())

    def scored(self) -> torch.Tensor:
        """``[B, L]`` bool: positions whose next-token prediction is a sampled token (the positions losses count)."""
        s = torch.zeros_like(self.generated)
        s[:, :-1] = self.generated[:, 1:]
        return s


@dataclass
class TopK:
    """A model's k likeliest next tokens at each position, at temperature 1: the form a teacher cache stores."""

    ids: torch.Tensor
    """``[..., k]`` int32 token ids, likeliest first."""
    logprobs: torch.Tensor
    """``[..., k]`` float32 their log-probabilities."""
    tail: torch.Tensor
    """``[...]`` float32 log of the probability outside them (``-inf`` when k covers the vocabulary)."""


def top_logprobs(logits: torch.Tensor, k: int) -> TopK:
    """``[..., V]`` logits -> their top-``k`` log-probabilities and the log of the rest."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    if k < logp.shape[-1]:
        tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)  # exact, not log(1 - sum)
    else:
        tail = logp.new_full(logp.shape[:-1], float("-inf"))
    return TopK(top.indices.to(torch.int32), top.values, tail)


def pick(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """``[B, V]`` float logits -> ``[B]`` token ids, row ``i`` drawn with ``generators[i]``.

    Inverse-CDF sampling: each row takes one uniform number from its own generator
    and finds it in the cumulative distribution, so rows stay independent of one
    another at the cost of one ``searchsorted`` for the whole batch.
    """
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    order = None
    if sampling.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the tokens above it already reach top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(cdf.device)
    # The first position whose cumulative mass exceeds u: never a zero-probability token.
    k = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
    return (order.gather(-1, k) if order is not None else k).squeeze(-1)


def _takes(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_of(out):
    cache = out.get("cache")  # transformers 5; earlier releases return past_key_values
    return cache if cache is not None else out.past_key_values


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> ``[B, P]`` ids and bool mask, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = True
    return ids, mask


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    seeds: list[int],
    *,
    eos_ids: list[int],
    pad_id: int,
    vocab: int | None = None,
    any_running: Callable[[bool], bool] | None = None,
    top_k: int = 0,
) -> Generated:
    """Continue ``[B, P]`` left-padded prompts (``prompt_mask`` True on real tokens) by up to ``max_new_tokens``.

    ``seeds``: one per row. ``vocab``: sample only among the first ``vocab`` ids
    (heads padded past the tokenizer). ``top_k``: also keep the model's top-k
    log-probabilities (temperature 1, over those ids) behind every sampled token,
    in ``Generated.top``. ``any_running(this process still running)``
    -> whether any process is: models sharded over processes must run each
    forward on all of them, so every process keeps stepping until all are done.
    The model runs in eval mode and is put back as it was.
    """
    device = prompt_ids.device
    b, p = prompt_ids.shape
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(sorted(set(eos_ids)), device=device, dtype=torch.long)
    mask = prompt_mask.bool().clone()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kw = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
    # transformers 5 names the KV cache ``cache``; earlier releases (and some families) ``past_key_values``.
    cache_arg = "cache" if _takes(model, "cache") else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=prompt_ids, attention_mask=mask.long(), position_ids=positions, use_cache=True, **kw)
        cache, last = _cache_of(out), out.logits[:, -1]
        next_pos = positions[:, -1] + 1
        tokens, real, tops = [], [], []
        running = torch.ones(b, dtype=torch.bool, device=device)
        for step in range(sampling.max_new_tokens):
            logits = last[:, :vocab] if vocab is not None else last
            if top_k:
                tops.append(top_logprobs(logits, top_k))
            tok = torch.where(running, pick(logits, sampling, gens), torch.full_like(next_pos, pad_id))
            tokens.append(tok)
            real.append(running.clone())
            running &= ~torch.isin(tok, eos)
            more = bool(running.any())
            if any_running is not None:
                more = any_running(more)
            if not more or step == sampling.max_new_tokens - 1:
                break
            mask = torch.cat([mask, real[-1][:, None]], dim=1)
            out = model(
                input_ids=tok[:, None],
                attention_mask=mask.long(),
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_arg: cache},
                **kw,
            )
            cache, last = _cache_of(out), out.logits[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    new, new_real, pm = torch.stack(tokens, 1), torch.stack(real, 1), prompt_mask.bool()
    top = None
    if top_k:
        ids, logprobs, tail = (torch.stack([getattr(t, f) for t in tops], 1) for f in ("ids", "logprobs", "tail"))
        top = [TopK(ids[i][new_real[i]], logprobs[i][new_real[i]], tail[i][new_real[i]]) for i in range(b)]
    return join([prompt_ids[i][pm[i]] for i in range(b)], [new[i][new_real[i]] for i in range(b)], pad_id, top)


def join(
    prompts: list[torch.Tensor], continuations: list[torch.Tensor], pad_id: int, top: list[TopK] | None = None
) -> Generated:
    """Prompts and continuations (``[n]`` ids each) as left-aligned rows: positions count from 0, as in training.

    ``top``: per row, the top-k behind each of its ``n`` continuation tokens (``[n, k]``), placed at the positions
    that predict them; the other positions hold a uniform stand-in no loss counts.
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    b, device = len(prompts), prompts[0].device
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, width, dtype=torch.bool, device=device)
    gen = torch.zeros_like(mask)
    for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        n = len(p) + len(c)
        ids[i, :n] = torch.cat([p.to(device), c.to(device)])
        mask[i, :n], gen[i, len(p) : n] = True, True
    out = Generated(ids, mask, gen)
    if top is not None:
        k = top[0].ids.shape[-1]
        # Unscored positions: k equally likely tokens and no tail, finite wherever a loss touches it before masking.
        t_ids = torch.arange(k, dtype=torch.int32, device=device).expand(b, width, k).clone()
        t_logp = torch.full((b, width, k), -math.log(k), device=device)
        t_tail = torch.full((b, width), float("-inf"), device=device)
        for i, (p, t) in enumerate(zip(prompts, top, strict=True)):
            if not len(p):  # no position predicts the first token of an empty prompt's continuation
                t = TopK(t.ids[1:], t.logprobs[1:], t.tail[1:])
            start = max(len(p) - 1, 0)
            at = slice(start, start + len(t.ids))  # position j predicts token j + 1
            t_ids[i, at], t_logp[i, at], t_tail[i, at] = t.ids.to(device), t.logprobs.to(device), t.tail.to(device)
        out.top = TopK(t_ids, t_logp, t_tail)
    return out
