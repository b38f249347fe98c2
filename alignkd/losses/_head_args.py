"""The argument checks and the walk builder shared by the LM-head losses (``lm_head``).

Every check takes the public function's name, so an error starts with what the user called.
"""

from __future__ import annotations

import torch

from alignkd.losses._head_chunks import HeadWalk, matmul_dtype
from alignkd.losses.logits import check_kl_args

# Elements of one [chunk_tokens, V] float32 temporary by default. On a CPU the
# chunk's elementwise passes (softmax, exp, the gradient) run at cache speed only
# when a temporary fits the cache (16 MB); a GPU wants bigger matmuls (256 MB).
CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 26


def build_walk(
    name: str, hidden, head, bias, *, rows, vocab: int, chunk_tokens, softcap, lora=None, **differs
) -> HeadWalk:
    """A walk over the student's head (``hidden``, ``head``, ``bias``, and ``lora``: ``(A, B, scale)`` of an
    adapter on it) of ``rows``: the student's side (gradients wanted, matmul dtype, rows per chunk) is the same
    for every function; ``differs`` is what the caller adds to :class:`HeadWalk`'s defaults (a teacher, labels, a
    divergence, two outputs)."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be > 0 or None, got {softcap}")
    if chunk_tokens is not None and not chunk_tokens >= 1:
        raise ValueError(f"{name}: chunk_tokens must be >= 1, got {chunk_tokens}")
    grad_on = torch.is_grad_enabled()
    lora_a, lora_b, lora_scale = check_lora(name, head, lora)
    return HeadWalk(
        rows=rows,
        vocab=vocab,
        chunk_tokens=int(chunk_tokens) if chunk_tokens else default_chunk(vocab, hidden.device),
        needs=tuple(bool(grad_on and x is not None and x.requires_grad) for x in (hidden, head, bias, lora_a, lora_b)),
        lora_scale=lora_scale,
        dtype=matmul_dtype(hidden),
        softcap=None if softcap is None else float(softcap),
        **differs,
    )


def check_lora(name: str, head: torch.Tensor, lora) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """``lora``: None, or ``(A [r, D], B [V, r], scale)`` of a LoRA adapter on a ``[V, D]`` head."""
    if lora is None:
        return None, None, 0.0
    a, b, scale = lora
    v, d = head.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d or b.shape != (v, a.shape[0]):
        raise ValueError(
            f"{name}: a LoRA adapter on a head of shape {(v, d)} has A [r, {d}] and B [{v}, r], "
            f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
        )
    return a, b, float(scale)


def default_chunk(vocab: int, device: torch.device) -> int:
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, elements // vocab)


def divergence_fields(name: str, kind: str, temperature: float, beta: float, alpha: float) -> dict:
    """The divergence fields of a walk, checked as :func:`kl_div` checks them."""
    check_kl_args(kind, temperature, beta, alpha, name)
    return {"kind": kind, "temperature": float(temperature), "beta": float(beta), "alpha": float(alpha)}


def check_head(name: str, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, side: str = "") -> None:
    """One model's hidden states ``[B, T, D]`` / ``[N, D]``, head ``[V, D]`` and bias ``[V]``."""
    if h.dim() not in (2, 3):
        raise ValueError(f"{name}: {side}hidden states have shape {tuple(h.shape)}; pass [B, T, D] or [N, D]")
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"{name}: {side}head has shape {tuple(w.shape)}, expected [V, {h.shape[-1]}] "
            "(the output-head weight, one row per token id, as wide as the hidden states)"
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{name}: {side}bias has shape {tuple(b.shape)}, expected ({w.shape[0]},), one per head row")


def check_labels(name: str, labels: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``labels`` flattened to long, after checking their shape (``mask``'s), dtype and the counted ids' range."""
    if tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(
            f"{name}: labels have shape {tuple(labels.shape)}, expected {tuple(mask.shape)} (one id per position)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must hold integer token ids, got {labels.dtype}")
    flat = labels.reshape(-1).to(device=mask.device, dtype=torch.long)
    counted = flat[mask.reshape(-1)]
    if counted.numel() and int(counted.max()) >= vocab:
        raise ValueError(f"{name}: label id {int(counted.max())} is out of range for a vocabulary of {vocab}")
    return flat
