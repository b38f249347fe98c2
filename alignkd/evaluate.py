"""Evaluate a student beside its teacher and baselines: what it kept, and what it costs.

Each metric is a function of one model (and its tokenizer) that returns plain
numbers: perplexity on held-out text, label accuracy on a labelled CSV,
BLEU/ROUGE/CER of greedy continuations, prefill and decode latency, parameter
count and size on disk. :func:`evaluate_models` loads one model at a time (the
teacher first), runs the metric groups that are not skipped, frees the model,
scores every other model's continuations against the teacher's (fidelity) and
works out the retention of the teacher's numbers. Its result is ``eval.json``,
which ``alignkd report`` reads.
"""

from __future__ import annotations

from alignkd.errors import EvalError

import copy
import dataclasses
import gc
import inspect
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd.data import wants_bos
from alignkd.precision import default_device, resolve_dtype

GROUPS = ("perplexity", "accuracy", "generation", "latency")
PROMPT_TOKENS = 64  # tokens of held-out text each generation prompt holds
MAX_TEXT_TOKENS = 256  # labelled texts are clipped to this, so long reviews do not dominate the cost
TEMPLATE = "Review: {text}\nSentiment:"  # a few-shot example is TEMPLATE + " {label}\n\n"
GENERATION_KEYS = ("bleu", "rouge1", "rouge2", "rougeL", "cer")
HIGHER_IS_BETTER = ("accuracy", "bleu", "rouge1", "rouge2", "rougeL")
LOWER_IS_BETTER = ("perplexity", "cer")
GENERATION_BATCH = 16  # prompts generated together; all have the same length, so no padding

Step = Callable[[int, int], None]  # on_step(done, total), for the progress display


@dataclass
class EvalSettings:
    """What ``alignkd eval`` measures and on how much data; the defaults are the CLI's."""

    text: str | None = None
    """Held-out text (file, folder, JSONL/CSV) for perplexity and generation; None: the packaged Moby-Dick."""
    labelled: str | None = None
    """CSV (or JSONL) with ``text`` and ``label`` columns for accuracy; None: the packaged sentiment test split."""
    ppl_tokens: int = 16384
    """Tokens of held-out text scored for perplexity (documents joined with EOS, cut to this)."""
    window: int = 512
    """Sliding-window length for perplexity, in tokens."""
    stride: int = 256
    """How far the window moves; each window scores only the tokens the previous one did not."""
    examples: int = 200
    """Labelled examples scored for accuracy (after the few-shot examples are taken out)."""
    shots: int = 4
    """In-context examples in the prompt of a causal LM (a classifier uses its head)."""
    prompts: int = 16
    """Held-out passages for generation metrics, evenly spaced through the text."""
    new_tokens: int = 32
    """Greedy tokens generated per prompt, and decode steps of the latency measurement."""
    latency_batch: int = 1
    """Batch size of the latency measurement."""
    latency_len: int = 128
    """Prompt length (tokens) of the latency measurement."""
    dtype: str = "auto"
    """Dtype the models are evaluated in: auto (bfloat16 where it is fast on the device, else float32), float32, bfloat16 or float16."""
    skip: tuple[str, ...] = ()
    """Metric groups not run: any of perplexity, accuracy, generation, latency."""
    device: str | None = None
    """Device the models run on; None: cuda when available, else cpu."""
    seed: int = 0
    """Seed of the few-shot draw and the order of the scored examples."""


def check_settings(s: EvalSettings) -> None:
    """Raise :class:`EvalError` naming the first setting out of range."""
    from alignkd.precision import DTYPE_NAMES

    for name in ("ppl_tokens", "window", "stride", "examples", "prompts", "new_tokens", "latency_batch", "latency_len"):
        if getattr(s, name) < 1:
            raise EvalError(f"{name} is {getattr(s, name)}; it must be at least 1")
    if s.window < 2:
        raise EvalError(f"window is {s.window}; a window needs at least 2 tokens to score one")
    if s.stride > s.window:
        raise EvalError(f"stride {s.stride} is longer than window {s.window}; tokens would go unscored, use stride <= window")
    if s.shots < 0:
        raise EvalError(f"shots is {s.shots}; it must be 0 or more")
    if s.dtype not in ("auto", *DTYPE_NAMES):
        raise EvalError(f"dtype {s.dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    bad = [g for g in s.skip if g not in GROUPS]
    if bad:
        raise EvalError(f"cannot skip {bad[0]!r}; the groups are {', '.join(GROUPS)}")


# ----------------------------------------------------------------------------- inputs


def _packaged(relative: str, message: str) -> str:
    """A packaged asset under ``alignkd.assets.cache_dir()``; ``message`` is the error when it is not there."""
    try:
        from alignkd.assets import cache_dir  # imported here: assets pulls in download code
    except ImportError:
        raise EvalError(message) from None
    path = Path(cache_dir()) / relative
    if not path.exists():
        raise EvalError(message)
    return str(path)


def read_held_out(source: str) -> list[str]:
    """Documents of held-out text, through :func:`alignkd.data.read_texts`."""
    from alignkd.data import DataError, read_texts

    try:
        return read_texts(source)
    except DataError as e:
        raise EvalError(str(e)) from None


def read_labelled(source: str) -> tuple[list[str], list[str], list[str]]:
    """Texts, their label names and the sorted class names from a CSV/JSONL with text,label columns."""
    from alignkd.data import DataError, read_labelled as read

    try:
        texts, ids, names = read(source)
    except DataError as e:
        # data.py names the training config's fields; here the fix is the file itself.
        hint = "; the labelled data needs text and label columns"
        raise EvalError(str(e).replace("; set data.text_field", hint).replace("; set data.label_field", hint)) from None
    return texts, [names[i] for i in ids], names


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenised and joined with EOS between them, cut to ``max_tokens``: ``-> [N]`` int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if max_tokens is not None and len(ids) >= max_tokens:
            break  # long corpora: tokenise only what is scored
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _check_context(model, need: int, what: str, fix: str) -> None:
    ctx = _context(model)
    if ctx is not None and need > ctx:
        raise EvalError(f"{what} needs {need} positions but the model's context is {ctx} tokens; {fix}")


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_kw(model) -> str:
    # transformers 5 renamed past_key_values to cache; older releases know only the old name.
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _out_cache(out):
    # Asking a transformers 5 output for past_key_values warns, so only fall back to it.
    return out["cache"] if "cache" in out else out.get("past_key_values")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


# ----------------------------------------------------------------------------- perplexity


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], *, max_tokens: int, window: int, stride: int, on_step: Step | None = None) -> tuple[float, int]:
    """Sliding-window perplexity of a causal LM over the first ``max_tokens`` text tokens of ``texts``.

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
    Returns ``(exp(total NLL / scored), scored)``.
    """
    ids = token_stream(tokenizer, texts, max_tokens).to(_device(model))
    lead = ids.new_tensor([tokenizer.bos_token_id] if wants_bos(tokenizer) else [])  # [0] or [1]
    n = ids.numel()
    if n < 2 - lead.numel():
        raise EvalError(f"the held-out text has {n} token(s); perplexity needs at least {2 - lead.numel()}")
    _check_context(model, min(window, n + lead.numel()), f"a perplexity window of {window} tokens", f"pass a window of at most {_context(model)}")
    span = window - lead.numel()  # text tokens per window
    step = min(stride, span)  # with BOS, stride == window would otherwise skip a token between windows
    count = 1 + max(0, -(-(n - span) // step))  # windows until one reaches the end
    nll, scored, prev_end = 0.0, 0, 0
    for i in range(count):
        begin = i * step
        end = min(begin + span, n)
        chunk = torch.cat([lead, ids[begin:end]])[None]  # [1, L]
        # Logit i predicts token i+1: the last `new` tokens need the `new + 1` logits before them
        # (the chunk's first token has none), so the head runs on those only.
        new = end - prev_end
        keep = min(new + 1, chunk.shape[1])
        extra = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
        logits = model(chunk, use_cache=False, **extra).logits[0, -keep:-1].float()  # [keep-1, V]
        targets = chunk[0, chunk.shape[1] - keep + 1 :]  # [keep-1]
        nll -= torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item()
        scored += targets.numel()
        prev_end = end
        if on_step:
            on_step(i + 1, count)
    return math.exp(nll / scored), scored


# ----------------------------------------------------------------------------- accuracy


def split_shots(labels: list[str], *, shots: int, examples: int | None = None, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the in-context examples and of the scored examples (disjoint), drawn with ``seed``.

    The shots take the classes in turn (so a 4-shot prompt of two classes holds
    two of each, not by chance four of one); the scored examples are the rest in
    a seeded shuffle, since labelled files are often sorted by label.
    """
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    classes = list(dict.fromkeys(labels[i] for i in order))
    pools = {c: [i for i in order if labels[i] == c] for c in classes}
    chosen: list[int] = []
    while len(chosen) < shots and any(pools.values()):
        for c in classes:
            if pools[c] and len(chosen) < shots:
                chosen.append(pools[c].pop(0))
    taken = set(chosen)
    scored = [i for i in order if i not in taken][:examples]
    if not scored:
        raise EvalError(f"{len(labels)} labelled example(s) and {shots} shot(s) leave none to score; give more examples or fewer --shots")
    return chosen, scored


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _clip(tokenizer, text: str) -> str:
    ids = _ids(tokenizer, text)
    return text if len(ids) <= MAX_TEXT_TOKENS else tokenizer.decode(ids[:MAX_TEXT_TOKENS])


@torch.inference_mode()
def demo_prefix(model, tokenizer, demos: list[tuple[str, str]]) -> tuple[int, object]:
    """``(length, KV cache)`` of the few-shot prompt: each ``(text, label)`` as ``TEMPLATE + " label\\n\\n"``.

    The tokenizer's BOS leads when it adds one. Every scored example shares this
    prefix, so its keys and values are computed once. ``(0, None)`` when empty.
    """
    text = "".join(TEMPLATE.format(text=_clip(tokenizer, t)) + f" {label}\n\n" for t, label in demos)
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]  # a tokenizer that appends EOS would end the prompt here
    if not ids:
        return 0, None
    out = model(torch.tensor([ids], device=_device(model)), use_cache=True)
    return len(ids), _out_cache(out)


@torch.inference_mode()
def label_scores(model, tokenizer, text: str, names: list[str], prefix: tuple[int, object] = (0, None)) -> list[float]:
    """Total log-likelihood of each label word ``" " + name`` after ``prefix`` + ``TEMPLATE`` of ``text``.

    ``prefix`` comes from :func:`demo_prefix`; it is copied, never changed.
    """
    device = _device(model)
    cache_kw = _cache_kw(model)
    length, cache = prefix
    query = _ids(tokenizer, TEMPLATE.format(text=_clip(tokenizer, text)))
    words = [_ids(tokenizer, " " + n) for n in names]
    _check_context(model, length + len(query) + max(map(len, words)), "the few-shot prompt", "use fewer --shots")
    out = model(torch.tensor([query], device=device), use_cache=True, **{cache_kw: copy.deepcopy(cache)})
    first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts each word's first token
    scores = []
    for w in words:
        score = first[w[0]].item()
        if len(w) > 1:  # the word's other tokens, each given the ones before it
            more = model(torch.tensor([w[:-1]], device=device), **{cache_kw: copy.deepcopy(_out_cache(out))})
            logp = torch.log_softmax(more.logits[0].float(), -1)
            score += logp.gather(-1, torch.tensor(w[1:], device=device)[:, None]).sum().item()
        scores.append(score)
    return scores


def _head_names(model, names: list[str]) -> list[str | None]:
    """The class name each output of a classifier head stands for.

    The head's own ``id2label`` when its names are the data's (any case);
    otherwise output i is the i-th sorted class name, as training assigns them.
    """
    id2label = getattr(model.config, "id2label", None) or {}
    by_lower = {n.lower(): n for n in names}
    head = [by_lower.get(str(id2label.get(i, "")).lower()) for i in range(model.config.num_labels)]
    if all(h is not None for h in head):
        return head
    return [names[i] if i < len(names) else None for i in range(model.config.num_labels)]


@torch.inference_mode()
def _classifier_predictions(model, tokenizer, texts: list[str], names: list[str], on_step: Step | None) -> list[str | None]:
    head = _head_names(model, names)
    max_len = min(_context(model) or 512, 512)
    preds: list[str | None] = []
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start : start + 16], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        logits = model(**enc.to(_device(model))).logits
        preds += [head[i] for i in logits.argmax(-1).tolist()]
        if on_step:
            on_step(len(preds), len(texts))
    return preds


def label_accuracy(
    model, tokenizer, texts: list[str], labels: list[str], *, shots: int, seed: int = 0,
    examples: int | None = None, names: list[str] | None = None, on_step: Step | None = None,
) -> float:
    """Accuracy on the examples :func:`split_shots` leaves to score.

    A causal LM picks the class whose word (``" " + name``) has the highest total
    log-likelihood after a prompt of ``shots`` fixed examples; a sequence
    classifier takes the argmax of its head. ``labels`` are class names;
    ``names`` (default: the sorted labels) are the candidates.
    """
    names = names or sorted(set(labels))
    demo_idx, scored = split_shots(labels, shots=shots, examples=examples, seed=seed)
    batch = [texts[i] for i in scored]
    if is_classifier(model):
        preds = _classifier_predictions(model, tokenizer, batch, names, on_step)
    else:
        prefix = demo_prefix(model, tokenizer, [(texts[i], labels[i]) for i in demo_idx])
        preds = []
        for text in batch:
            scores = label_scores(model, tokenizer, text, names, prefix)
            preds.append(names[max(range(len(names)), key=scores.__getitem__)])
            if on_step:
                on_step(len(preds), len(batch))
    return sum(p == labels[i] for p, i in zip(preds, scored)) / len(scored)


# ----------------------------------------------------------------------------- generation


def passages(ids: torch.Tensor, count: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` evenly spaced passages of a token stream ``[N]``: prompts ``[count, PROMPT_TOKENS]``, references ``[count, new_tokens]``."""
    span = PROMPT_TOKENS + new_tokens
    n = ids.numel()
    if n < span:
        raise EvalError(f"the held-out text has {n} tokens; generation needs at least {span} ({PROMPT_TOKENS} prompt + {new_tokens} new)")
    starts = [round(i * (n - span) / max(count - 1, 1)) for i in range(count)]
    rows = torch.stack([ids[s : s + span] for s in starts])
    return rows[:, :PROMPT_TOKENS], rows[:, PROMPT_TOKENS:]


def _generation_config(model, new_tokens: int, *, exact: bool = False):
    from transformers import GenerationConfig

    # A fresh config: a checkpoint's sampling settings (temperature, top_p) must not apply.
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    pad = model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact else None, do_sample=False,
        eos_token_id=eos, pad_token_id=pad,
    )


@torch.inference_mode()
def continuations(model, tokenizer, prompts: torch.Tensor, new_tokens: int, on_step: Step | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` ``[P, T]`` (``new_tokens`` at most, EOS ends one early), decoded.

    A tokenizer that adds BOS gets it before each prompt, as its model expects.
    """
    config = _generation_config(model, new_tokens)
    if wants_bos(tokenizer):
        prompts = torch.cat([torch.full_like(prompts[:, :1], tokenizer.bos_token_id), prompts], dim=1)
    texts: list[str] = []
    for start in range(0, len(prompts), GENERATION_BATCH):
        x = prompts[start : start + GENERATION_BATCH].to(_device(model))
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        texts += tokenizer.batch_decode(out[:, x.shape[1] :], skip_special_tokens=True)
        if on_step:
            on_step(len(texts), len(prompts))
    return texts


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """BLEU (sacrebleu, 0-100), mean ROUGE-1/2/L F1 (rouge_score) and CER (jiwer) of predictions vs references."""
    import jiwer
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise EvalError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(r, p) for p, r in zip(predictions, references)]
    out = {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = statistics.fmean(s[key].fmeasure for s in rouge)
    out["cer"] = float(jiwer.cer(reference=references, hypothesis=predictions))
    return out


# ----------------------------------------------------------------------------- cost


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
    device = _device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)
    out = {}
    if is_classifier(model):
        prefill = _timed(lambda: model(input_ids=ids), device, repeats, warmup)
    else:
        _check_context(model, length + new_tokens, "the latency prompt and its new tokens", "use a shorter --latency-len")
        extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        prefill = _timed(lambda: model(ids, use_cache=True, **extra), device, repeats, warmup)
    out["prefill_ms_per_token"] = 1000 * prefill / (batch * length)
    if not is_classifier(model) and new_tokens > 1:
        mask = torch.ones_like(ids)

        def generate(n: int) -> float:
            config = _generation_config(model, n, exact=True)
            return _timed(lambda: model.generate(ids, attention_mask=mask, generation_config=config), device, repeats, warmup)

        # Both runs share the prefill and the set-up, so their difference is the decode steps alone.
        steps = generate(new_tokens) - generate(1)
        out["decode_ms_per_token"] = 1000 * max(steps, 0.0) / (batch * (new_tokens - 1))
    for kind in ("prefill", "decode"):
        ms = out.get(f"{kind}_ms_per_token")
        if ms is not None:
            out[f"{kind}_tokens_per_s"] = 1000 / ms if ms > 0 else None
    return out


def param_counts(model) -> dict:
    """``params`` (tied weights once) and ``non_embedding_params``: less the input embedding and an untied output head."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
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


def retention(teacher_metrics: dict, metrics: dict) -> dict:
    """What a model kept of the teacher: 1.0 is all of it, above 1 is better than the teacher.

    Higher-is-better metrics give model/teacher, lower-is-better ones
    (perplexity, CER) teacher/model, latencies the speed-up teacher_ms/model_ms,
    and ``params`` the size ratio model/teacher. A metric missing on either side
    is left out; a zero denominator gives None.
    """

    def ratio(num: float | None, den: float | None):
        return None if num is None or den is None or den == 0 else num / den

    out = {}
    t, m = teacher_metrics, metrics
    for key in ("perplexity", "accuracy", *GENERATION_KEYS):
        if key in t and key in m:
            out[key] = ratio(t[key], m[key]) if key in LOWER_IS_BETTER else ratio(m[key], t[key])
    for kind in ("prefill", "decode"):
        key = f"{kind}_ms_per_token"
        if key in t and key in m:
            out[f"{kind}_speedup"] = ratio(t[key], m[key])
    if "params" in t and "params" in m:
        out["params"] = ratio(m["params"], t["params"])
    return out


# ----------------------------------------------------------------------------- models


def _check_model_path(role: str, path: str) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EvalError(f"{role}: {path} has no config.json; point it at a save_pretrained folder")
        return
    # A hub id is "name" or "org/name"; anything else that does not exist is a missing folder.
    if p.exists() or path.startswith((".", "/", "~")) or path.rstrip("/").count("/") > 1:
        raise EvalError(f"{role}: model folder not found: {path}")


def load(role: str, path: str, dtype: str, device: str):
    """``(model, tokenizer)`` in eval mode on ``device``: a sequence classifier when its config says so, else a causal LM."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from alignkd.models import ModelError, load_model, load_tokenizer

    _check_model_path(role, path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # HF's loading bars would break into our progress display
    try:
        config = AutoConfig.from_pretrained(path)
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        tokenizer = load_tokenizer(path, what=role)
        model = load_model(path, task="sequence_classification" if classifier else "causal_lm", dtype=dtype, what=role)
    except ModelError as e:
        raise EvalError(str(e)) from None
    except (OSError, ValueError) as e:
        raise EvalError(f"{role}: could not load {path!r} ({str(e).strip().splitlines()[0]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- orchestration


@dataclass
class _Inputs:
    """What every model is evaluated on, read once."""

    texts: list[str] | None = None
    labelled: tuple[list[str], list[str], list[str]] | None = None
    sources: dict = field(default_factory=dict)


def _read_inputs(s: EvalSettings) -> _Inputs:
    inputs = _Inputs(sources={"text": None, "labelled": None})
    if "perplexity" not in s.skip or "generation" not in s.skip:
        source = s.text or _packaged(
            "corpus/moby_dick", "no held-out text given and the packaged text is not prepared; run `alignkd assets` or pass --text"
        )
        inputs.sources["text"] = str(source)
        inputs.texts = read_held_out(str(source))
    if "accuracy" not in s.skip:
        source = s.labelled or _packaged(
            "sentiment/test.csv", "no labelled data given and the packaged sentiment data is not prepared; run `alignkd assets` or pass --labelled"
        )
        inputs.sources["labelled"] = str(source)
        inputs.labelled = read_labelled(str(source))
    return inputs


class _Display:
    """A rich bar per metric group, and a line with its result and wall time when it ends."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def say(self, line: str) -> None:
        if self.bar:
            self.bar.console.print(line)

    @contextmanager
    def group(self, label: str):
        """Yields ``on_step(done, total)``; afterwards ``self.seconds`` is the group's wall time."""
        task = self.bar.add_task(label, total=None) if self.bar else None

        def on_step(done: int, total: int) -> None:
            if task is not None:
                self.bar.update(task, completed=done, total=total)

        t0 = time.perf_counter()
        try:
            yield on_step
        finally:
            self.seconds = time.perf_counter() - t0
            if task is not None:
                self.bar.remove_task(task)


def _evaluate_one(role: str, path: str, s: EvalSettings, inputs: _Inputs, device: str, show: _Display) -> tuple[dict, list[str] | None]:
    """Metrics of one model, and its continuations (None when generation did not run)."""
    t0 = time.perf_counter()
    model, tok = load(role, path, s.dtype, device)
    show.say(f"[bold]{role}[/]: loaded {path} in {time.perf_counter() - t0:.1f} s")
    causal = not is_classifier(model)
    metrics: dict = {}
    outputs = None
    if "perplexity" not in s.skip and causal:
        with show.group(f"{role} perplexity") as step:
            ppl, n = perplexity(model, tok, inputs.texts, max_tokens=s.ppl_tokens, window=s.window, stride=s.stride, on_step=step)
        metrics.update(perplexity=ppl, ppl_tokens_scored=n, bos=wants_bos(tok))
        show.say(f"  perplexity {ppl:.4g} over {n} tokens ({show.seconds:.1f} s)")
    if "accuracy" not in s.skip:
        texts, labels, names = inputs.labelled
        with show.group(f"{role} accuracy") as step:
            _, scored = split_shots(labels, shots=s.shots, examples=s.examples, seed=s.seed)
            acc = label_accuracy(model, tok, texts, labels, shots=s.shots, seed=s.seed, examples=s.examples, names=names, on_step=step)
        metrics.update(accuracy=acc, accuracy_examples=len(scored))
        show.say(f"  accuracy {acc:.3f} on {len(scored)} examples ({show.seconds:.1f} s)")
    if "generation" not in s.skip and causal:
        with show.group(f"{role} generation") as step:
            _check_context(model, wants_bos(tok) + PROMPT_TOKENS + s.new_tokens, "generation", "use fewer --new-tokens")
            prompts, refs = passages(token_stream(tok, inputs.texts), s.prompts, s.new_tokens)
            outputs = continuations(model, tok, prompts, s.new_tokens, on_step=step)
            metrics.update(generation_metrics(outputs, tok.batch_decode(refs, skip_special_tokens=True)))
        show.say(f"  bleu {metrics['bleu']:.3g} rougeL {metrics['rougeL']:.3g} cer {metrics['cer']:.3g} ({show.seconds:.1f} s)")
    if "latency" not in s.skip:
        with show.group(f"{role} latency") as step:
            metrics.update(latency(model, batch=s.latency_batch, length=s.latency_len, new_tokens=s.new_tokens if causal else 0))
        show.say(f"  prefill {metrics['prefill_ms_per_token']:.3g} ms/token, decode {metrics.get('decode_ms_per_token', float('nan')):.3g} ms/token ({show.seconds:.1f} s)")
    metrics.update(param_counts(model))
    metrics["size_mb"] = size_on_disk(path)
    # Free the model before the next one loads: only one is in memory at a time.
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics, outputs


def evaluate_models(models: dict[str, str], settings: EvalSettings, *, teacher: str | None = None, out: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluate each ``role -> path`` model (``teacher`` names the teacher's role); returns ``eval.json``'s dict.

    The teacher runs first, so each other model's continuations can be scored
    against the teacher's (``*_vs_teacher``) and its numbers turned into
    retention. With ``out``, the dict is also written to ``out/eval.json``.
    """
    check_settings(settings)
    if not models:
        raise EvalError("no models to evaluate; give at least one model path")
    if teacher is not None and teacher not in models:
        raise EvalError(f"teacher role {teacher!r} is not among the models ({', '.join(models)})")
    order = ([teacher] if teacher else []) + [r for r in models if r != teacher]
    for role in order:  # fail before the first long evaluation, not after it
        _check_model_path(role, models[role])
    inputs = _read_inputs(settings)
    device = settings.device or str(default_device())
    settings = dataclasses.replace(settings, dtype=resolve_dtype(settings.dtype, device))
    result: dict = {
        "settings": {
            **inputs.sources, "device": device, "dtype": settings.dtype,
            **{k: getattr(settings, k) for k in ("ppl_tokens", "window", "stride", "examples", "shots", "prompts", "new_tokens", "latency_batch", "latency_len")},
        },
        "models": {},
        "retention": {},
    }
    reference = None
    with _Display(progress) as show:
        for role in order:
            metrics, outputs = _evaluate_one(role, models[role], settings, inputs, device, show)
            if role == teacher:
                reference = outputs
            elif reference is not None and outputs is not None:
                fidelity = generation_metrics(outputs, reference)
                metrics.update({f"{k}_vs_teacher": v for k, v in fidelity.items()})
            result["models"][role] = {"path": str(models[role]), "metrics": metrics}
    if teacher is not None:
        base = result["models"][teacher]["metrics"]
        result["retention"] = {r: retention(base, e["metrics"]) for r, e in result["models"].items() if r != teacher}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------- display and CLI

# Table rows: metric key, label, retention key shown beside it (None: none).
ROWS = [
    ("perplexity", "perplexity ↓", "perplexity"),
    ("ppl_tokens_scored", "  tokens scored", None),
    ("accuracy", "accuracy ↑", "accuracy"),
    ("accuracy_examples", "  examples", None),
    *[(k, f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}", k) for k in GENERATION_KEYS],
    *[(f"{k}_vs_teacher", f"{k} vs teacher", None) for k in GENERATION_KEYS],
    ("prefill_ms_per_token", "prefill ms/token", "prefill_speedup"),
    ("decode_ms_per_token", "decode ms/token", "decode_speedup"),
    ("prefill_tokens_per_s", "prefill tokens/s", None),
    ("decode_tokens_per_s", "decode tokens/s", None),
    ("params", "params", "params"),
    ("non_embedding_params", "  non-embedding", None),
    ("size_mb", "size MiB", None),
]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def print_table(result: dict, console=None) -> None:
    """Models as columns, metrics as rows, each non-teacher model followed by its retention column."""
    from rich.console import Console
    from rich.table import Table

    models, kept = result["models"], result.get("retention", {})
    table = Table(title="alignkd eval", caption="retention: share of the teacher's score kept (↓ metrics inverted); ms rows: speed-up")
    table.add_column("metric", no_wrap=True)
    for role in models:
        table.add_column(role, justify="right")
        if role in kept:
            table.add_column(f"{role} kept", justify="right", style="cyan")
    for key, label, rkey in ROWS:
        if not any(key in m["metrics"] for m in models.values()):
            continue
        cells = [label]
        for role, entry in models.items():
            cells.append(_fmt(entry["metrics"].get(key)))
            if role in kept:
                v = kept[role].get(rkey) if rkey else None
                cells.append("" if v is None else (f"{v:.2f}×" if rkey.endswith("speedup") else f"{v:.2f}"))
        table.add_row(*cells)
    (console or Console()).print(table)


def cli_main(args) -> int:
    """``alignkd eval``: evaluate, print the table, write ``--out/eval.json``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display
    try:
        models = {"teacher": args.teacher, "student": args.model} if args.teacher else {"model": args.model}
        for item in args.baseline:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise EvalError(f"--baseline {item!r} is not NAME=PATH; write e.g. --baseline ce=runs/ce/student")
            if name in models:
                raise EvalError(f"--baseline name {name!r} is taken; choose another name")
            models[name] = path
        settings = EvalSettings(
            text=args.text, labelled=args.labelled, ppl_tokens=args.ppl_tokens, window=args.window, stride=args.stride,
            examples=args.examples, shots=args.shots, prompts=args.prompts, new_tokens=args.new_tokens,
            latency_batch=args.latency_batch, latency_len=args.latency_len, dtype=args.dtype, skip=tuple(args.skip),
        )
        result = evaluate_models(models, settings, teacher="teacher" if args.teacher else None, out=args.out)
    except EvalError as e:
        print(f"alignkd eval: error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0
