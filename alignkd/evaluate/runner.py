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

import contextlib
import dataclasses
import gc
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd.data import wants_bos
from alignkd.display import Tasks
from alignkd.engine.judge import distinct_n, rouge_l
from alignkd.errors import EvalError
from alignkd.evaluate.accuracy import label_accuracy, split_shots
from alignkd.evaluate.catalogue import TOKENIZERS_DIFFER, chance_level, near_chance, retention
from alignkd.evaluate.cost import latency, param_counts, size_on_disk
from alignkd.evaluate.generation import (
    GENERATION_BATCH,
    PROMPT_TOKENS,
    continuations,
    generation_metrics,
    passages,
    sampled,
)
from alignkd.evaluate.harness import Harness, open_harness
from alignkd.evaluate.inputs import packaged, read_held_out, read_labelled, token_stream
from alignkd.evaluate.loading import check_context, check_model_path, is_classifier, load
from alignkd.evaluate.perplexity import score_text
from alignkd.evaluate.settings import EvalSettings, check_settings
from alignkd.evaluate.task_results import near_chance_tasks, split_records, task_retention
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


@dataclass
class _Outputs:
    """What one model generated, kept to score it against the teacher once every model has run."""

    texts: list[str]
    """Greedy continuations, decoded."""
    greedy: list[list[int]]
    """The same, as ids."""
    prompts: list[torch.Tensor]
    """The prompts of the sampled continuations (BOS first where its tokenizer adds one)."""
    samples: list[torch.Tensor]
    """Continuations sampled at temperature 1."""


def _evaluate_one(
    role: str, path: str, s: EvalSettings, inputs: _Inputs, device: str, show: Tasks, harness: Harness | None
) -> tuple[dict, _Outputs | None, dict | None]:
    """Metrics of one model, what it generated (None when generation did not run) and its lm-eval task records (None
    without tasks)."""
    t0 = time.perf_counter()
    model, tok = load(role, path, s.dtype, device)
    show.say(f"[bold]{role}[/]: loaded {path} in {time.perf_counter() - t0:.1f} s")
    causal = not is_classifier(model)
    metrics: dict = {}
    outputs = None
    if "perplexity" not in s.skip and causal:
        with show.running(f"{role} perplexity") as step:
            score = score_text(
                model, tok, inputs.texts, max_tokens=s.ppl_tokens, window=s.window, stride=s.stride, on_step=step
            )
        ppl, n = score.perplexity, score.tokens
        metrics.update(
            perplexity=ppl,
            bits_per_byte=score.bits_per_byte,
            bits_per_char=score.bits_per_char,
            ppl_tokens_scored=n,
            bos=wants_bos(tok),
        )
        show.say(
            f"  perplexity {ppl:.4g} over {n} tokens, {score.bits_per_byte:.4g} bits per byte ({show.seconds:.1f} s)"
        )
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
    tasks = _run_tasks(role, model, tok, harness, show) if harness is not None and causal else None
    if "generation" not in s.skip and causal:
        with show.running(f"{role} generation") as step:
            check_context(model, wants_bos(tok) + PROMPT_TOKENS + s.new_tokens, "generation", "use fewer --new-tokens")
            prompts, refs = passages(token_stream(tok, inputs.texts), s.prompts, s.new_tokens)
            texts, greedy = continuations(model, tok, prompts, s.new_tokens, on_step=step, ids=True)
            metrics.update(generation_metrics(texts, tok.batch_decode(refs, skip_special_tokens=True)))
            heads, samples = sampled(model, tok, prompts, s.new_tokens)
            metrics["gen_distinct2"] = distinct_n([x.tolist() for x in samples])
            outputs = _Outputs(texts, greedy, heads, samples)
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
    return metrics, outputs, tasks


def _run_tasks(role: str, model, tok, harness: Harness, show: Tasks) -> dict:
    """One model's lm-eval task records, and a line of their scores."""
    with show.running(f"{role} lm-eval tasks"):
        tasks = harness.run(model, tok)
    scores = ", ".join(f"{n} {r['metric']} {r['value']:.3g} ({r['shots']}-shot)" for n, r in tasks.items())
    show.say(f"  {scores} ({show.seconds:.1f} s)")
    return tasks


def evaluate_models(
    models: dict[str, str],
    settings: EvalSettings,
    *,
    teacher: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    task_assets: dict[str, Path] | None = None,
) -> dict:
    """Evaluate each ``role -> path`` model (``teacher`` names the teacher's role); returns ``eval.json``'s dict.

    The teacher runs first, so each other model's continuations can be scored
    against the teacher's (``*_vs_teacher``) and its numbers turned into
    retention. With ``out``, the dict is also written to ``out/eval.json``.
    ``task_assets`` (asset name -> folder) feeds the packaged lm-eval tasks; None: the assets cache.
    """
    order = _checked_order(models, settings, teacher, out)
    with _harness(settings, task_assets) as harness:  # lm-eval and the task names are checked before any model loads
        inputs = _read_inputs(settings)
        device = settings.device or str(default_device())
        settings = dataclasses.replace(settings, dtype=resolve_dtype(settings.dtype, device))
        result: dict = {
            "settings": _settings_record(settings, inputs, device),
            "models": _evaluate_in_order(models, order, teacher, settings, inputs, device, progress, harness),
            "retention": {},
            "warnings": [],
        }
    if harness is not None:
        _task_results(result, teacher)
    if teacher is not None:
        base = result["models"][teacher]["metrics"]
        result["retention"] = {r: retention(base, e["metrics"]) for r, e in result["models"].items() if r != teacher}
        result["warnings"] = [w for w in (near_chance(base),) if w] + result.pop("task_warnings", [])
    if "perplexity" not in settings.skip and len({_vocabulary(p) for p in models.values()}) > 1:
        result["warnings"].append(TOKENIZERS_DIFFER)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _harness(s: EvalSettings, assets: dict[str, Path] | None):
    """:func:`open_harness` for the settings' tasks, or an empty block without tasks."""
    if not s.tasks:
        return contextlib.nullcontext()
    return open_harness(
        list(s.tasks), num_fewshot=s.num_fewshot, limit=s.limit, paths=list(s.task_paths), assets=assets, seed=s.seed
    )


def _task_results(result: dict, teacher: str | None) -> None:
    """Move each model's task records into ``eval.json``'s ``tasks``, ``models[role].tasks`` and ``task_retention``."""
    records = {r: e.pop("tasks") for r, e in result["models"].items() if "tasks" in e}
    result["tasks"], scores = split_records(records)
    for role, s in scores.items():
        result["models"][role]["tasks"] = s
    if teacher in scores:
        result["task_retention"] = {
            r: task_retention(result["tasks"], scores[teacher], s) for r, s in scores.items() if r != teacher
        }
        result["task_warnings"] = near_chance_tasks(result["tasks"], scores[teacher])


def _vocabulary(path: str) -> str:
    """A digest of a model's vocabulary (token -> id): equal digests, the same tokenizer."""
    from alignkd.models import load_tokenizer

    vocab = load_tokenizer(path).get_vocab()
    return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()


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
        **(
            {
                "tasks": list(settings.tasks),
                "num_fewshot": settings.num_fewshot,
                "limit": settings.limit,
                "task_paths": list(settings.task_paths),
                "seed": settings.seed,
            }
            if settings.tasks
            else {}
        ),
    }


def _evaluate_in_order(
    models: dict[str, str],
    order: list[str],
    teacher: str | None,
    settings: EvalSettings,
    inputs: _Inputs,
    device: str,
    progress: bool,
    harness: Harness | None = None,
) -> dict:
    """Returns ``eval.json``'s ``models``: each role's path and metrics, with fidelity to the teacher's outputs (and
    each role's lm-eval task records under ``tasks``, which :func:`_task_results` then sorts out)."""
    evaluated: dict = {}
    reference = None
    generated: dict[str, _Outputs] = {}
    with Tasks(progress, bar=True, transient=True) as show:
        for role in order:
            metrics, outputs, tasks = _evaluate_one(role, models[role], settings, inputs, device, show, harness)
            if role == teacher:
                reference = outputs
            elif reference is not None and outputs is not None:
                fidelity = generation_metrics(outputs.texts, reference.texts)
                metrics.update({f"{k}_vs_teacher": v for k, v in fidelity.items()})
                metrics["gen_rougeL"] = statistics.fmean(
                    rouge_l(a, b) for a, b in zip(outputs.greedy, reference.greedy, strict=True)
                )
            if outputs is not None:
                generated[role] = outputs
            evaluated[role] = {"path": str(models[role]), "metrics": metrics}
            if tasks is not None:
                evaluated[role]["tasks"] = tasks
        if reference is not None:
            _judged_by_teacher(models[teacher], settings, device, generated, reference, evaluated, show)
    return evaluated


def _judged_by_teacher(
    path: str, s: EvalSettings, device: str, generated: dict, reference: _Outputs, evaluated: dict, show: Tasks
) -> None:
    """Each model's ``gen_teacher_nll``: the teacher, loaded again, scores its sampled continuations (the teacher's
    own too, for comparison). A model whose prompts tokenise otherwise than the teacher's is left out."""
    from alignkd.engine.judge import teacher_nll
    from alignkd.models.generate import join

    teacher, tok = load("teacher", path, s.dtype, device)
    with show.running("teacher judging samples"), torch.inference_mode():
        for role, out in generated.items():
            if [p.tolist() for p in out.prompts] != [p.tolist() for p in reference.prompts]:
                continue
            total, count = 0.0, 0
            for start in range(0, len(out.prompts), GENERATION_BATCH):
                part = slice(start, start + GENERATION_BATCH)
                gen = join(out.prompts[part], out.samples[part], teacher.config.pad_token_id or 0)
                gen = type(gen)(gen.input_ids.to(device), gen.mask.to(device), gen.generated.to(device))
                t, n = teacher_nll(teacher, gen, len(tok))
                total, count = total + t, count + n
            evaluated[role]["metrics"]["gen_teacher_nll"] = total / count if count else float("nan")
    del teacher
    gc.collect()
