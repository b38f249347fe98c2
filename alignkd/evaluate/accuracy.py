"""Label accuracy: few-shot label-word likelihoods for a causal LM, the head's argmax for a classifier."""

from __future__ import annotations

import copy
import random

import torch

from alignkd.errors import EvalError
from alignkd.evaluate.loading import cache_kw, check_context, context_length, device_of, is_classifier, out_cache
from alignkd.evaluate.settings import Step

MAX_TEXT_TOKENS = 256  # labelled texts are clipped to this, so long reviews do not dominate the cost
TEMPLATE = "Review: {text}\nSentiment:"  # a few-shot example is TEMPLATE + " {label}\n\n"


def split_shots(
    labels: list[str], *, shots: int, examples: int | None = None, seed: int = 0
) -> tuple[list[int], list[int]]:
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
        raise EvalError(
            f"{len(labels)} labelled example(s) and {shots} shot(s) leave none to score; "
            "give more examples or fewer --shots"
        )
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
    out = model(torch.tensor([ids], device=device_of(model)), use_cache=True)
    return len(ids), out_cache(out)


@torch.inference_mode()
def label_scores(model, tokenizer, text: str, names: list[str], prefix: tuple[int, object] = (0, None)) -> list[float]:
    """Total log-likelihood of each label word ``" " + name`` after ``prefix`` + ``TEMPLATE`` of ``text``.

    ``prefix`` comes from :func:`demo_prefix`; it is copied, never changed.
    """
    device = device_of(model)
    kw = cache_kw(model)
    length, cache = prefix
    query = _ids(tokenizer, TEMPLATE.format(text=_clip(tokenizer, text)))
    words = [_ids(tokenizer, " " + n) for n in names]
    check_context(model, length + len(query) + max(map(len, words)), "the few-shot prompt", "use fewer --shots")
    out = model(torch.tensor([query], device=device), use_cache=True, **{kw: copy.deepcopy(cache)})
    first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts each word's first token
    scores = []
    for w in words:
        score = first[w[0]].item()
        if len(w) > 1:  # the word's other tokens, each given the ones before it
            more = model(torch.tensor([w[:-1]], device=device), **{kw: copy.deepcopy(out_cache(out))})
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
def _classifier_predictions(
    model, tokenizer, texts: list[str], names: list[str], on_step: Step | None
) -> list[str | None]:
    head = _head_names(model, names)
    max_len = min(context_length(model) or 512, 512)
    preds: list[str | None] = []
    for start in range(0, len(texts), 16):
        enc = tokenizer(
            texts[start : start + 16], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        logits = model(**enc.to(device_of(model))).logits
        preds += [head[i] for i in logits.argmax(-1).tolist()]
        if on_step:
            on_step(len(preds), len(texts))
    return preds


def label_accuracy(
    model,
    tokenizer,
    texts: list[str],
    labels: list[str],
    *,
    shots: int,
    seed: int = 0,
    examples: int | None = None,
    names: list[str] | None = None,
    on_step: Step | None = None,
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
    return sum(p == labels[i] for p, i in zip(preds, scored, strict=True)) / len(scored)
