"""Evaluate a student beside its teacher and baselines: what it kept, and what it costs.

Each metric is a function of one model (and its tokenizer) that returns plain
numbers (:mod:`.perplexity`, :mod:`.accuracy`, :mod:`.generation`, :mod:`.cost`).
:func:`evaluate_models` loads one model at a time (the teacher first), runs the
metric groups that are not skipped, frees the model, scores every other model's
continuations against the teacher's (fidelity) and works out the retention of
the teacher's numbers (:func:`.catalogue.retention`), with a warning when the
teacher's accuracy is near chance. Its result is ``eval.json``, which ``alignkd
report`` reads.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd.data import wants_bos
from alignkd.display import Tasks
from alignkd.errors import EvalError
from alignkd.evaluate.accuracy import label_accuracy, split_shots
from alignkd.evaluate.catalogue import chance_level, near_chance, retention
from alignkd.evaluate.cost import latency, param_counts, size_on_disk
from alignkd.evaluate.generation import PROMPT_TOKENS, continuations, generation_metrics, passages
from alignkd.evaluate.inputs import packaged, read_held_out, read_labelled, token_stream
from alignkd.evaluate.loading import check_context, check_model_path, is_classifier, load
from alignkd.evaluate.perplexity import perplexity
from alignkd.evaluate.settings import EvalSettings, check_settings
from alignkd.precision import default_device, resolve_dtype


@dataclass
class _Inputs:
    """What every model is evaluated on, read once."""

    texts: list[str] | None = None
    labelled: tuple[list[str], list[str], list[str]] | None = None
    sources: dict = field(default_factory=dict)


def _read_inputs(s: EvalSettings) -> _Inputs:
    inputs = _Inputs(sources={"text": None, "labelled": None})
    if "perplexity" not in s.skip or "generation" not in s.skip:
        source = s.text or packaged(
            "corpus/moby_dick",
            "no held-out text given and the packaged text is not prepared; run `alignkd assets` or pass --text",
        )
        inputs.sources["text"] = str(source)
        inputs.texts = read_held_out(str(source))
    if "accuracy" not in s.skip:
        source = s.labelled or packaged(
            "sentiment/test.csv",
            "no labelled data given and the packaged sentiment data is not prepared; "
            "run `alignkd assets` or pass --labelled",
        )
        inputs.sources["labelled"] = str(source)
        inputs.labelled = read_labelled(str(source))
    return inputs


def _evaluate_one(
    role: str, path: str, s: EvalSettings, inputs: _Inputs, device: str, show: Tasks
) -> tuple[dict, list[str] | None]:
    """Metrics of one model, and its continuations (None when generation did not run)."""
    t0 = time.perf_counter()
    model, tok = load(role, path, s.dtype, device)
    show.say(f"[bold]{role}[/]: loaded {path} in {time.perf_counter() - t0:.1f} s")
    causal = not is_classifier(model)
    metrics: dict = {}
    outputs = None
    if "perplexity" not in s.skip and causal:
        with show.running(f"{role} perplexity") as step:
            ppl, n = perplexity(
                model, tok, inputs.texts, max_tokens=s.ppl_tokens, window=s.window, stride=s.stride, on_step=step
            )
        metrics.update(perplexity=ppl, ppl_tokens_scored=n, bos=wants_bos(tok))
        show.say(f"  perplexity {ppl:.4g} over {n} tokens ({show.seconds:.1f} s)")
    if "accuracy" not in s.skip:
        texts, labels, names = inputs.labelled
        with show.running(f"{role} accuracy") as step:
            _, scored = split_shots(labels, shots=s.shots, examples=s.examples, seed=s.seed)
            acc = label_accuracy(
                model, tok, texts, labels, shots=s.shots, seed=s.seed, examples=s.examples, names=names, on_step=step
            )
        chance = chance_level([labels[i] for i in scored])
        metrics.update(
            accuracy=acc, accuracy_above_chance=acc - chance, accuracy_chance=chance, accuracy_examples=len(scored)
        )
        show.say(f"  accuracy {acc:.3f} on {len(scored)} examples ({show.seconds:.1f} s)")
    if "generation" not in s.skip and causal:
        with show.running(f"{role} generation") as step:
            check_context(model, wants_bos(tok) + PROMPT_TOKENS + s.new_tokens, "generation", "use fewer --new-tokens")
            prompts, refs = passages(token_stream(tok, inputs.texts), s.prompts, s.new_tokens)
            outputs = continuations(model, tok, prompts, s.new_tokens, on_step=step)
            metrics.update(generation_metrics(outputs, tok.batch_decode(refs, skip_special_tokens=True)))
        show.say(
            f"  bleu {metrics['bleu']:.3g} rougeL {metrics['rougeL']:.3g} cer {metrics['cer']:.3g} "
            f"({show.seconds:.1f} s)"
        )
    if "latency" not in s.skip:
        with show.running(f"{role} latency") as step:
            metrics.update(
                latency(model, batch=s.latency_batch, length=s.latency_len, new_tokens=s.new_tokens if causal else 0)
            )
        show.say(
            f"  prefill {metrics['prefill_ms_per_token']:.3g} ms/token, "
            f"decode {metrics.get('decode_ms_per_token', float('nan')):.3g} ms/token ({show.seconds:.1f} s)"
        )
    metrics.update(param_counts(model))
    metrics["size_mb"] = size_on_disk(path)
    # Free the model before the next one loads: only one is in memory at a time.
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics, outputs


def evaluate_models(
    models: dict[str, str],
    settings: EvalSettings,
    *,
    teacher: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate each ``role -> path`` model (``teacher`` names the teacher's role); returns ``eval.json``'s dict.

    The teacher runs first, so each other model's continuations can be scored
    against the teacher's (``*_vs_teacher``) and its numbers turned into
    retention. With ``out``, the dict is also written to ``out/eval.json``.
    """
    order = _checked_order(models, settings, teacher, out)
    inputs = _read_inputs(settings)
    device = settings.device or str(default_device())
    settings = dataclasses.replace(settings, dtype=resolve_dtype(settings.dtype, device))
    result: dict = {
        "settings": _settings_record(settings, inputs, device),
        "models": _evaluate_in_order(models, order, teacher, settings, inputs, device, progress),
        "retention": {},
        "warnings": [],
    }
    if teacher is not None:
        base = result["models"][teacher]["metrics"]
        result["retention"] = {r: retention(base, e["metrics"]) for r, e in result["models"].items() if r != teacher}
        result["warnings"] = [w for w in (near_chance(base),) if w]
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _checked_order(
    models: dict[str, str], settings: EvalSettings, teacher: str | None, out: str | Path | None
) -> list[str]:
    """Returns the roles in evaluation order (the teacher first), once the settings, models and ``out`` check out."""
    check_settings(settings)
    if not models:
        raise EvalError("no models to evaluate; give at least one model path")
    if teacher is not None and teacher not in models:
        raise EvalError(f"teacher role {teacher!r} is not among the models ({', '.join(models)})")
    order = ([teacher] if teacher else []) + [r for r in models if r != teacher]
    for role in order:  # fail before the first long evaluation, not after it
        check_model_path(role, models[role])
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise EvalError(f"--out {out} is a file; give the folder eval.json goes in")
    return order


def _settings_record(settings: EvalSettings, inputs: _Inputs, device: str) -> dict:
    """Returns ``eval.json``'s ``settings``: the input sources, device, dtype and the sizes that shape each metric."""
    return {
        **inputs.sources,
        "device": device,
        "dtype": settings.dtype,
        **{
            k: getattr(settings, k)
            for k in (
                "ppl_tokens",
                "window",
                "stride",
                "examples",
                "shots",
                "prompts",
                "new_tokens",
                "latency_batch",
                "latency_len",
            )
        },
    }


def _evaluate_in_order(
    models: dict[str, str],
    order: list[str],
    teacher: str | None,
    settings: EvalSettings,
    inputs: _Inputs,
    device: str,
    progress: bool,
) -> dict:
    """Returns ``eval.json``'s ``models``: each role's path and metrics, with fidelity to the teacher's outputs."""
    evaluated: dict = {}
    reference = None
    with Tasks(progress, bar=True, transient=True) as show:
        for role in order:
            metrics, outputs = _evaluate_one(role, models[role], settings, inputs, device, show)
            if role == teacher:
                reference = outputs
            elif reference is not None and outputs is not None:
                fidelity = generation_metrics(outputs, reference)
                metrics.update({f"{k}_vs_teacher": v for k, v in fidelity.items()})
            evaluated[role] = {"path": str(models[role]), "metrics": metrics}
    return evaluated
