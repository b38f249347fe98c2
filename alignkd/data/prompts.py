"""Prompts for generation: a JSONL file of prompt texts or chat ``messages`` -> token ids.

A row is ``{"prompt": "..."}`` (the field is ``generation.prompt_field``) or
``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
tokenizer's chat template and its generation prompt, as instruct models expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignkd.errors import DataError

WHERE = "generation.prompts"


def _text(row: object, n: int, field: str, tokenizer) -> tuple[str, bool]:
    """(text, whether it is a rendered chat) of row ``n`` (1-based)."""
    if isinstance(row, dict) and isinstance(row.get(field), str):
        return row[field], False
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                f"{WHERE}: row {n} has messages, and the tokenizer has no chat template to render them; "
                f"give the text in a '{field}' field, or use a tokenizer with a chat template"
            )
        try:
            return tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False), True
        except Exception as e:  # a template's own complaint (a role it does not know ...), in one line
            raise DataError(f"{WHERE}: row {n}: the chat template could not render its messages ({e})") from None
    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(
        f"{WHERE}: row {n} has no '{field}' text or 'messages' list (it has: {fields}); set generation.prompt_field"
    )


def load_prompts(path: str, tokenizer, *, field: str, max_tokens: int, bos_id: int | None) -> list[torch.Tensor]:
    """Each row's prompt as ``[n]`` token ids: its last ``max_tokens`` tokens, led by ``bos_id`` when given."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{WHERE}: file not found: {path}")
    prompts = []
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{WHERE}: {path} line {n} is not valid JSON ({e.msg})") from None
            text, chat = _text(row, n, field, tokenizer)
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            # A chat template writes its own BOS text; plain prompts start as the training blocks do.
            lead = [bos_id] if bos_id is not None and not chat and (not ids or ids[0] != bos_id) else []
            ids = lead + ids
            if len(ids) > max_tokens:  # keep the end: it is what the continuation follows
                ids = ids[:1] + ids[len(ids) - max_tokens + 1 :] if lead else ids[-max_tokens:]
            if not ids:
                raise DataError(f"{WHERE}: row {n}'s prompt is empty; remove the row or give it text")
            prompts.append(torch.tensor(ids, dtype=torch.long))
    if not prompts:
        raise DataError(f"{WHERE}: {path} holds no prompts; add JSONL rows with a '{field}' field")
    return prompts
