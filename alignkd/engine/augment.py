"""Classification rows the teacher labels: variants of the training examples (TinyBERT-style augmentation) and
snippets of unlabelled text.

A variant replaces a share of an example's tokens (``data.augment_p``) with one
of a language model's ``data.augment_k`` most likely tokens at that position
(the original token excluded): a causal LM proposes from the tokens before the
position, a masked LM from the whole example with the chosen positions masked.
TinyBERT does the same with whole words and BERT; tokens keep this model-agnostic.

These rows carry no gold label (it does not hold for a changed text): their
label is ``TEACHER_LABEL``, and the step labels them with the teacher's class
distribution from the forward it runs anyway (the output terms read it, and a
label-reading term such as ``ce`` takes its most likely class;
``Classification.targets``). Labelling them in advance would double the
teacher's cost for rows a run may never draw. The rows are written once, keyed
by the data, the proposing model and the settings, into ``.alignkd-augment/``
beside the data, and read back from memory-mapped files as batches need them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alignkd.align.tasks import TEACHER_LABEL
from alignkd.data.rows import Rows
from alignkd.data.sources import read_texts
from alignkd.data.tokens import cache_folder, locked
from alignkd.errors import ConfigError
from alignkd.precision import default_device
from alignkd.teacher.cache_format import data_hash, teacher_fingerprint
from alignkd.teacher.samples import store_key

AUGMENT_FOLDER = ".alignkd-augment"
BATCH = 32  # examples per forward of the proposing model
FILES = ("input_ids", "mask")


def with_teacher_rows(cfg, tokenizer, teacher: nn.Module, train: dict, say=print) -> dict:
    """``train`` (``input_ids``, ``mask``, ``labels``) followed by the variants and unlabelled snippets the config
    asks for, as :class:`Rows`, their labels ``TEACHER_LABEL``; ``train`` itself when it asks for neither."""
    d = cfg.data
    if not d.augment and not d.unlabelled:
        return train
    extra = []
    if d.augment:
        extra.append(_stored(cfg, "augment", train, say, lambda: _variants(cfg, tokenizer, teacher, train)))
    if d.unlabelled:
        extra.append(_stored(cfg, "unlabelled", train, say, lambda: _snippets(cfg, tokenizer)))
    for part in extra:
        part["labels"] = torch.full((len(part["input_ids"]),), TEACHER_LABEL, dtype=torch.long)
    return {k: Rows(train[k], *(part[k] for part in extra)) for k in ("input_ids", "mask", "labels")}


# ----------------------------------------------------------------------------- the store


def _stored(cfg, what: str, train: dict, say, make) -> dict:
    """The ``what`` rows (``input_ids``, ``mask``): read from the store, or made and written first."""
    d = cfg.data
    meta = {"what": what, "seq_len": d.seq_len, "seed": cfg.train.seed}
    if what == "augment":
        meta.update(
            data=data_hash(train["input_ids"]),
            # the teacher's own body proposes where augment_lm is unset
            lm=teacher_fingerprint(d.augment_lm or cfg.teacher.path),
            variants=d.augment,
            p=d.augment_p,
            k=d.augment_k,
        )
        beside = d.train
    else:
        source = str(Path(d.unlabelled).resolve()) if Path(d.unlabelled).exists() else d.unlabelled
        meta.update(source=source, max_rows=d.unlabelled_rows, text_field=d.text_field)
        beside = d.unlabelled
    local = Path(beside).exists()
    root = cache_folder(
        beside if local else ".",
        "auto",
        say,
        folder=AUGMENT_FOLDER,
        fallback="augment",
        key=f"data.{what}",
        label=f"data.{what}",
        choices="a writable folder beside the data",
        beside=local,
    )
    folder = root / store_key(**meta)
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{folder.name}.lock"):  # processes of a launch: one makes the rows, the rest read them
        if not (folder / "meta.json").is_file():
            say(f"data.{what}: making the rows (once; kept in {folder})")
            ids, mask = make()
            tmp = root / f".{folder.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, array in {"input_ids": ids.numpy(), "mask": mask.numpy()}.items():
                np.save(tmp / f"{name}.npy", array)
            (tmp / "meta.json").write_text(json.dumps({**meta, "rows": len(ids)}, indent=1))
            os.replace(tmp, folder)  # whole or absent
        else:
            rows = json.loads((folder / "meta.json").read_text())["rows"]
            say(f"data.{what}: reusing {rows:,} rows in {folder}")
    rows = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in FILES}
    say(f"data.{what}: {len(rows['input_ids']):,} rows the teacher labels as the steps draw them")
    return rows


# ----------------------------------------------------------------------------- variants


def _proposer(cfg, tokenizer, teacher: nn.Module):
    """``(model, masked)``: the language model that proposes replacements, and whether it is a masked LM."""
    path = cfg.data.augment_lm
    if path is None:
        if not getattr(teacher.config, "tie_word_embeddings", False) or getattr(teacher.config, "model_type", "") in (
            "bert",
            "roberta",
            "distilbert",
        ):
            raise ConfigError(
                "data.augment_lm: the teacher is a classifier without a language-model head to propose words from; "
                "name a causal or masked LM with the teacher's tokenizer (e.g. the model it was fine-tuned from)"
            )
        return _TiedBody(teacher.to(default_device())), False
    from transformers import AutoConfig

    from alignkd.models import load_model, load_tokenizer
    from alignkd.models.loading import check_tokenizers

    archs = AutoConfig.from_pretrained(path).architectures or []
    masked = any(a.endswith("ForMaskedLM") for a in archs)
    try:
        check_tokenizers(tokenizer, load_tokenizer(path, what="data.augment_lm"))
    except Exception as e:
        raise ConfigError(f"data.augment_lm: {e}") from None
    lm = load_model(path, task="masked_lm" if masked else "causal_lm", dtype=cfg.teacher.dtype, what="data.augment_lm")
    return lm.to(default_device()).eval(), masked


class _TiedBody(nn.Module):
    """A classifier's body with its input embedding as the output head (models that tie the two)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.body, self.embedding = classifier.base_model, classifier.get_input_embeddings()

    def forward(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return type("Out", (), {"logits": hidden @ self.embedding.weight.T})()


@torch.no_grad()
def _variants(cfg, tokenizer, teacher: nn.Module, train: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.augment`` variants of every training example: ids ``[N * augment, T]`` and their masks."""
    d = cfg.data
    lm, masked = _proposer(cfg, tokenizer, teacher)
    device = next(lm.parameters()).device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    ids_all, mask_all = torch.as_tensor(train["input_ids"][:]), torch.as_tensor(train["mask"][:]).bool()
    out_ids, out_mask = [], []
    for start in range(0, len(ids_all), BATCH):
        ids, mask = ids_all[start : start + BATCH], mask_all[start : start + BATCH]
        # Positions that may change: real, not special, not the first (a causal LM has nothing to propose from).
        free = mask & ~torch.isin(ids, special)
        free[:, 0] = False
        top = None
        if not masked:  # one forward serves every variant: the prediction at i - 1 proposes position i
            top = _candidates(lm, ids, mask, d.augment_k, len(tokenizer), device)
            top = torch.cat([top[:, :1], top[:, :-1]], dim=1)
        for v in range(d.augment):
            gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + start * 97 + v)
            chosen = free & (torch.rand(ids.shape, generator=gen) < d.augment_p)
            if masked:  # a masked LM sees this variant's chosen positions masked
                x = ids.masked_fill(chosen, tokenizer.mask_token_id)
                top = _candidates(lm, x, mask, d.augment_k, len(tokenizer), device)
            pick = torch.randint(0, d.augment_k, ids.shape, generator=gen)
            # The pick-th candidate other than the original: skip one place where the original comes before it.
            orig_at = (top == ids[..., None]).float().argmax(-1)
            has_orig = (top == ids[..., None]).any(-1)
            place = pick + (has_orig & (orig_at <= pick)).long()
            new = top.gather(-1, place[..., None]).squeeze(-1)
            out_ids.append(torch.where(chosen, new, ids))
            out_mask.append(mask)
    return torch.cat(out_ids), torch.cat(out_mask)


def _candidates(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, k: int, vocab: int, device) -> torch.Tensor:
    """``[B, T, k + 1]``: the LM's likeliest tokens at each position (k + 1: the original may be among them)."""
    logits = lm(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits
    return logits[..., :vocab].float().topk(k + 1, dim=-1).indices.cpu()


# ----------------------------------------------------------------------------- unlabelled text


def _snippets(cfg, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.unlabelled`` cut into ``seq_len``-token snippets (special tokens as the tokenizer adds them)."""
    d = cfg.data
    head, tail = _special_ends(tokenizer)
    body = max(1, d.seq_len - len(head) - len(tail))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    cap = d.unlabelled_rows if d.unlabelled_rows is not None else float("inf")
    for text in read_texts(d.unlabelled, text_field=d.text_field):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for s in range(0, len(ids), body):
            if len(rows) >= cap:
                break
            rows.append(head + ids[s : s + body] + tail)
    if not rows:
        raise ConfigError(f"data.unlabelled: {d.unlabelled} holds no text; name a text source or remove the key")
    out = torch.full((len(rows), d.seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), d.seq_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        r = r[: d.seq_len]
        out[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return out, mask


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS; BERT's [CLS] and [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    return full[:at], full[at + len(plain) :]
