"""Sliding-window perplexity of a causal LM on held-out text, and its bits per byte and per character."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignkd.data import wants_bos
from alignkd.errors import EvalError
from alignkd.evaluate.inputs import token_lengths
from alignkd.evaluate.loading import accepts, check_context, context_length, device_of
from alignkd.evaluate.settings import Step


@dataclass(frozen=True)
class TextScore:
    """A causal LM's negative log-likelihood of held-out text, per token, per byte and per character."""

    nll: float
    """Total NLL of the scored tokens, in nats."""
    tokens: int
    """Tokens scored."""
    bytes: int
    """UTF-8 bytes of the text those tokens stand for."""
    chars: int
    """Characters of that text."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        """Comparable across tokenizers, where perplexity (per token of each model's own tokenizer) is not."""
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / self.chars if self.chars else math.nan


def perplexity(
    model, tokenizer, texts: list[str], *, max_tokens: int, window: int, stride: int, on_step: Step | None = None
) -> tuple[float, int]:
    """``(perplexity, tokens scored)`` of :func:`score_text`."""
    s = score_text(model, tokenizer, texts, max_tokens=max_tokens, window=window, stride=stride, on_step=on_step)
    return s.perplexity, s.tokens


@torch.inference_mode()
def score_text(
    model, tokenizer, texts: list[str], *, max_tokens: int, window: int, stride: int, on_step: Step | None = None
) -> TextScore:
    """Sliding-window NLL of a causal LM over the first ``max_tokens`` text tokens of ``texts``.

    The windows are ``window`` tokens long and start every ``stride`` tokens; a
    window scores only the tokens past the end of the previous window, each with
    all the context the window gives it (the transformers strided-perplexity
    recipe). With ``stride < window`` every token but the first is scored
    exactly once; with ``stride == window`` the windows are disjoint and each
    one's first token, which nothing in its window predicts, goes unscored.

    A tokenizer that adds BOS (:func:`alignkd.data.wants_bos`) gets it at the head
    of every window, as its model saw every text in training: a window is then
    BOS + ``window - 1`` text tokens, moving by ``min(stride, window - 1)``; BOS
    is never scored, and every text token is, the first one predicted from BOS.
    Bits per byte and per character count the text of the scored tokens alone
    (:func:`alignkd.evaluate.inputs.token_lengths`).
    """
    ids, nbytes, nchars = token_lengths(tokenizer, texts, max_tokens)
    ids = ids.to(device_of(model))
    lead = ids.new_tensor([tokenizer.bos_token_id] if wants_bos(tokenizer) else [])  # [0] or [1]
    n = ids.numel()
    if n < 2 - lead.numel():
        raise EvalError(f"the held-out text has {n} token(s); perplexity needs at least {2 - lead.numel()}")
    check_context(
        model,
        min(window, n + lead.numel()),
        f"a perplexity window of {window} tokens",
        f"pass a window of at most {context_length(model)}",
    )
    span = window - lead.numel()  # text tokens per window
    step = min(stride, span)  # with BOS, stride == window would otherwise skip a token between windows
    count = 1 + max(0, -(-(n - span) // step))  # windows until one reaches the end
    nll, scored, prev_end, scored_bytes, scored_chars = 0.0, 0, 0, 0, 0
    for i in range(count):
        begin = i * step
        end = min(begin + span, n)
        chunk = torch.cat([lead, ids[begin:end]])[None]  # [1, L]
        # Logit i predicts token i+1: the last `new` tokens need the `new + 1` logits before them
        # (the chunk's first token has none), so the head runs on those only.
        new = end - prev_end
        keep = min(new + 1, chunk.shape[1])
        extra = {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}
        logits = model(chunk, use_cache=False, **extra).logits[0, -keep:-1].float()  # [keep-1, V]
        targets = chunk[0, chunk.shape[1] - keep + 1 :]  # [keep-1]
        nll -= torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item()
        scored += targets.numel()
        # The targets are the window's last keep - 1 tokens, which end at text token `end`.
        scored_bytes += int(nbytes[end - targets.numel() : end].sum())
        scored_chars += int(nchars[end - targets.numel() : end].sum())
        prev_end = end
        if on_step:
            on_step(i + 1, count)
    return TextScore(nll, scored, scored_bytes, scored_chars)
