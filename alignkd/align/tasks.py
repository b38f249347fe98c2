"""What differs between causal LM, masked LM and classification, in one small object per task.

A task knows its data, how a batch is made, which positions count, what the
logits predict, and how the held-out loss is scored. The loop and the terms
ask it; nothing else branches on the task's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from alignkd.data import build_classification_data, build_lm_data, resolve_bos
from alignkd.errors import ConfigError
from alignkd.models.capture import Record

TEACHER_LABEL = -1
"""Classification: the label of a row the teacher labels in the step (augmented variants, unlabelled text)."""


@dataclass
class Pair:
    """The teacher's side of a batch when the two models have different tokenizers: the same text in its tokens,
    and the aligned span of every token on both sides (``alignkd.data.pairs``)."""

    teacher_ids: torch.Tensor
    """``[B, U]`` the teacher's tokens, padded on the right."""
    teacher_mask: torch.Tensor
    """``[B, U]`` bool: real teacher tokens."""
    student_span: torch.Tensor
    """``[B, T]`` int32: the span of each student token (negative: none)."""
    teacher_span: torch.Tensor
    """``[B, U]`` int32: the span of each teacher token."""

    @property
    def spans(self) -> int:
        """How many span ids the batch uses (one past the largest)."""
        return int(max(self.student_span.max(), self.teacher_span.max())) + 1

    def to(self, device) -> Pair:
        return Pair(
            *(t.to(device) for t in (self.teacher_ids, self.teacher_mask, self.student_span, self.teacher_span))
        )


@dataclass
class Batch:
    input_ids: torch.Tensor
    """``[B, T]`` token ids (masked-LM: with [MASK] substitutions)."""
    mask: torch.Tensor
    """``[B, T]`` bool, True on real tokens."""
    labels: torch.Tensor | None = None
    """``[B]`` classes, or ``[B, T]`` masked-LM targets (-100 = not predicted); None for causal LM."""
    index: torch.Tensor | None = None
    """``[B]`` the examples' indices in the training data (a teacher cache is read by them); None for generated text."""
    scored: torch.Tensor | None = None
    """``[B, T]`` bool: the positions the losses count, where that is not every real one: on a generated batch, the
    positions whose next token was sampled (never the prompt's own tokens, never padding). None: ``mask``."""
    teacher: Record | None = None
    """The teacher's side, carried with the batch instead of computed: the top-k log-probabilities kept with its
    samples (``generation.teacher_top_k``). None: the teacher runs, or its cache is read, as for any batch."""
    pair: Pair | None = None
    """The teacher's own tokens of the same text and the aligned spans, when the tokenizers differ; else None."""

    @property
    def counted_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: the positions the token-level losses count."""
        return self.mask if self.scored is None else self.scored


class CausalLM:
    """Next-token prediction over packed blocks; every real position is counted."""

    name = "causal_lm"

    def load_data(self, cfg, tokenizer, say=lambda _: None) -> tuple[dict, dict]:
        """``({"input_ids": [N, T]}, {...})``; resolves ``data.bos`` in place, so config.yaml records the choice.

        ``input_ids`` may be :class:`alignkd.data.Blocks` read from a token cache file (``say`` hears about it).
        """
        d = cfg.data
        bos_id = resolve_bos(d.bos, tokenizer)
        d.bos = "never" if bos_id is None else "always"
        lm = build_lm_data(
            d.train,
            tokenizer,
            seq_len=d.seq_len,
            eval=d.eval,
            eval_fraction=d.eval_fraction,
            text_field=d.text_field,
            max_train_tokens=d.max_train_tokens,
            seed=cfg.train.seed,
            bos_id=bos_id,
            token_cache=d.token_cache,
            say=say,
        )
        return {"input_ids": lm.train}, {"input_ids": lm.eval}

    def make_batch(self, data: dict, idx: torch.Tensor, tokenizer, seed: int) -> Batch:
        ids = data["input_ids"][idx]
        mask = data["mask"][idx].bool() if "mask" in data else torch.ones_like(ids, dtype=torch.bool)
        return Batch(ids, mask, data["labels"][idx] if "labels" in data else None, idx)

    def counted(self, batch: Batch) -> int:
        """Positions the token-level losses average over (the grad-accumulation normaliser)."""
        return int(batch.counted_mask.sum())

    def logits(self, x) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Student and teacher logits cut to the shared vocabulary, and the positions the output terms count."""
        t = x.teacher.logits
        return self.cut_vocab(x.student.logits, x.vocab), self.cut_vocab(t, x.vocab) if t is not None else None, x.mask

    def feature_mask(self, batch: Batch, leading_bos: bool) -> torch.Tensor | None:
        """Positions the feature terms compare: the counted ones, less a leading BOS (None: the counted ones).

        The logits at BOS still count for the output terms: they predict the block's first token.
        """
        if not leading_bos:
            return None
        m = batch.counted_mask.clone()
        m[:, 0] = False  # rows start at column 0, generated ones too (they are left-aligned)
        return m

    def cut_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        # Heads padded past the tokenizer meet on the first `vocab` ids.
        return logits[..., :vocab]

    def targets(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Position i predicts token i + 1; the last position has no target (so a leading BOS is never one)."""
        tgt = torch.zeros_like(x.input_ids)
        tgt[:, :-1] = x.input_ids[:, 1:]
        has = x.mask.clone()
        has[:, :-1] &= x.attended()[:, 1:]
        has[:, -1] = False
        return tgt, has

    def scored(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out scoring: ``[N, V]`` logits and ``[N]`` targets of the predicted positions."""
        has = batch.mask[:, 1:] & batch.mask[:, :-1]
        return logits[:, :-1][has], batch.input_ids[:, 1:][has]

    def metrics(self, loss: float, correct: int, count: int) -> dict:
        return {"eval_ppl": math.exp(min(loss, 50.0))}


class MaskedLM(CausalLM):
    """BERT-style: 15 % of real tokens are targets; counted positions are the targets."""

    name = "masked_lm"

    def make_batch(self, data: dict, idx: torch.Tensor, tokenizer, seed: int) -> Batch:
        b = super().make_batch(data, idx, tokenizer, seed)
        ids, labels = _mlm_mask(b.input_ids, b.mask, tokenizer, torch.Generator().manual_seed(seed))
        return Batch(ids, b.mask, labels)

    def counted(self, batch: Batch) -> int:
        return int((batch.labels != -100).sum())

    def logits(self, x):
        s, t, _ = super().logits(x)
        return s, t, x.labels != -100

    def targets(self, x):
        return x.labels.clamp(min=0), x.labels != -100

    def feature_mask(self, batch, leading_bos):
        return None  # BOS choice applies to packed causal-LM blocks only

    def scored(self, logits, batch):
        has = batch.labels != -100
        return logits[has], batch.labels[has]


class Classification(CausalLM):
    """One label per sequence: the logits are ``[B, classes]`` and each sequence counts once."""

    name = "sequence_classification"

    def load_data(self, cfg, tokenizer, say=lambda _: None) -> tuple[dict, dict]:
        d = cfg.data  # labelled sets stay in memory: no token cache to report
        c = build_classification_data(
            d.train,
            tokenizer,
            seq_len=d.seq_len,
            eval=d.eval,
            eval_fraction=d.eval_fraction,
            text_field=d.text_field,
            label_field=d.label_field,
            seed=cfg.train.seed,
        )
        return (
            {"input_ids": c.train_ids, "mask": c.train_mask, "labels": c.train_labels},
            {"input_ids": c.eval_ids, "mask": c.eval_mask, "labels": c.eval_labels},
        )

    def counted(self, batch: Batch) -> int:
        return batch.input_ids.shape[0]

    def logits(self, x):
        s = x.student.logits
        return s, x.teacher.logits, torch.ones(s.shape[0], dtype=torch.bool, device=s.device)

    def cut_vocab(self, logits, vocab):
        return logits  # class logits: nothing to cut

    def feature_mask(self, batch, leading_bos):
        return None

    def targets(self, x):
        labels = x.labels
        by_teacher = labels == TEACHER_LABEL
        if by_teacher.any():  # rows without a gold label take the teacher's most likely class
            if x.teacher.logits is None:
                raise ConfigError(
                    "data.augment / data.unlabelled: these rows are labelled by the teacher's classes, and this run "
                    "does not run the teacher's head; add an output term such as {type: kl}"
                )
            labels = torch.where(by_teacher, x.teacher.logits.argmax(-1), labels)
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def scored(self, logits, batch):
        return logits, batch.labels

    def metrics(self, loss, correct, count):
        return {"eval_accuracy": correct / count}


TASKS = {t.name: t for t in (CausalLM(), MaskedLM(), Classification())}


class PairedLM(CausalLM):
    """Causal LM where the student has a tokenizer of its own: blocks of the student's tokens, each with the same
    text in the teacher's tokens and the spans where the two tokenizations meet (``alignkd.data.pairs``).

    The student's logits are never cut to a shared vocabulary (there is none); the terms that compare the two
    models read ``x.pair`` and ``matched``, the ids that spell the same text on both sides.
    """

    def __init__(
        self, student_tokenizer, teacher_tokenizer, matched: tuple[torch.Tensor, torch.Tensor], teacher_len: int | None
    ):
        self.student_tokenizer, self.teacher_tokenizer, self.matched = student_tokenizer, teacher_tokenizer, matched
        self.teacher_len = teacher_len
        """The most teacher tokens a block keeps (the teacher's positions); None: as many as its text makes."""

    def load_data(self, cfg, tokenizer, say=lambda _: None) -> tuple[dict, dict]:
        """Both tokenizations of every block; ``data.bos`` is resolved for the student's tokenizer (the teacher's
        side gets the BOS its own tokenizer adds)."""
        import time

        from alignkd.data.pairs import build_paired_data

        d = cfg.data
        student_bos = resolve_bos(d.bos, self.student_tokenizer)
        d.bos = "never" if student_bos is None else "always"
        t0 = time.perf_counter()
        train, held = build_paired_data(
            d.train,
            self.student_tokenizer,
            self.teacher_tokenizer,
            seq_len=d.seq_len,
            eval=d.eval,
            eval_fraction=d.eval_fraction,
            text_field=d.text_field,
            max_train_tokens=d.max_train_tokens,
            seed=cfg.train.seed,
            student_bos=student_bos,
            teacher_bos=resolve_bos("auto", self.teacher_tokenizer),
            teacher_len=self.teacher_len,
        )
        n = train["input_ids"].shape[0] + held["input_ids"].shape[0]
        say(f"paired {n} blocks in both tokenizations in {time.perf_counter() - t0:.1f} s (once, before training)")
        self._check_unknown(train["input_ids"], say)
        return train, held

    def _check_unknown(self, ids: torch.Tensor, say) -> None:
        """Text the student's tokenizer cannot spell becomes its unknown token, which nothing can teach."""
        tok = self.student_tokenizer
        if tok.unk_token_id is None:
            return
        share = float((ids == tok.unk_token_id).float().mean())
        where = f"{100 * share:.1f} % of the training text's student tokens are its unknown token {tok.unk_token!r}"
        if share > 0.01:
            raise ConfigError(
                f"student tokenizer: {where} (characters it cannot encode); give the student a byte-level or "
                "byte-fallback tokenizer, or one trained on this text (student.new_tokenizer)"
            )
        if share > 0:
            say(f"[yellow]student tokenizer: {where}[/]")

    def make_batch(self, data: dict, idx: torch.Tensor, tokenizer, seed: int) -> Batch:
        b = super().make_batch(data, idx, tokenizer, seed)
        if "teacher_ids" in data:
            b.pair = Pair(
                data["teacher_ids"][idx],
                data["teacher_mask"][idx].bool(),
                *(data[k][idx] for k in ("student_span", "teacher_span")),
            )
        return b

    def logits(self, x):
        return x.student.logits, None, x.mask

    def cut_vocab(self, logits, vocab):
        return logits

    @staticmethod
    def teacher_view(data: dict) -> dict:
        """Held-out blocks in the teacher's own tokens, to score the teacher on."""
        return {"input_ids": data["teacher_ids"], "mask": data["teacher_mask"], "bytes": data["teacher_bytes"]}

    @staticmethod
    def student_view(data: dict) -> dict:
        return {"input_ids": data["input_ids"], "bytes": data["student_bytes"]}


def _mlm_mask(
    ids: torch.Tensor, mask: torch.Tensor, tokenizer, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: 15% of real tokens are targets; 80% of those become [MASK], 10% random."""
    r = torch.rand(ids.shape, generator=gen)
    target = (r < 0.15) & mask
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    ids = ids.clone()
    r2 = torch.rand(ids.shape, generator=gen)
    ids[target & (r2 < 0.8)] = tokenizer.mask_token_id
    rand = target & (r2 >= 0.8) & (r2 < 0.9)
    ids[rand] = torch.randint(len(tokenizer), ids.shape, generator=gen)[rand]
    return ids, labels


EVAL_LOGITS_BYTES = 256 * 1024 * 1024
"""The most float32 logits one evaluation forward makes: with a large vocabulary (262k tokens: 128 MB a row of 128
positions) a batch is scored a few rows at a time, the same sums in less memory."""


def _eval_rows(task, model: nn.Module, batch: Batch) -> list[slice]:
    """The row slices of ``batch`` that one evaluation forward each takes."""
    b, t = batch.input_ids.shape
    vocab = 0 if isinstance(task, Classification) else getattr(model.config, "vocab_size", 0) or 0
    per = max(1, EVAL_LOGITS_BYTES // max(t * vocab * 4, 1)) if vocab else b
    return [slice(r, min(r + per, b)) for r in range(0, b, per)]


@torch.no_grad()
def heldout(task, model: nn.Module, data: dict, tokenizer, *, batch_size: int, batches: int, device, autocast) -> dict:
    """Held-out loss of ``model`` (and perplexity, or accuracy for classifiers) on ``data``."""
    was_training = model.training
    model.eval()
    n = data["input_ids"].shape[0]
    total_loss, total_count, correct = 0.0, 0, 0
    scored = min(n, batch_size * batches)
    for i, start in enumerate(range(0, scored, batch_size)):
        whole = task.make_batch(data, torch.arange(start, min(start + batch_size, n)), tokenizer, seed=10_000 + i)
        for rows in _eval_rows(task, model, whole):
            labels = whole.labels[rows].to(device) if whole.labels is not None else None
            b = Batch(whole.input_ids[rows].to(device), whole.mask[rows].to(device), labels)
            with autocast():
                logits = model(input_ids=b.input_ids, attention_mask=b.mask.long()).logits.float()
            scores, targets = task.scored(logits, b)
            total_loss += nn.functional.cross_entropy(scores, targets, reduction="sum").item()
            correct += int((scores.argmax(-1) == targets).sum())
            total_count += targets.numel()
            del logits, scores
    model.train(was_training)
    if total_count == 0:
        return {"eval_loss": float("nan")}
    loss = total_loss / total_count
    out = {"eval_loss": loss, **task.metrics(loss, correct, total_count)}
    if "bytes" in data:  # text tokenized two ways (PairedLM): bits per byte compare where perplexities cannot
        out["eval_bpb"] = total_loss / math.log(2) / max(int(data["bytes"][:scored].sum()), 1)
    return out
