"""The chunk loop behind ``lm_head_kl``, ``lm_head_ce`` and ``lm_head_kl_ce``.

The counted rows are walked in chunks of ``chunk_tokens``: each chunk's logits are
made from the hidden states and the heads, the float32 maths gives the losses and
their gradient w.r.t. the logits, and that gradient is pushed through the head
into float32 buffers for the student's hidden states, head and bias. The backward
pass multiplies those buffers by ``grad_output``.

Precision: the head matmuls run in the walk's dtypes (see :func:`matmul_dtype`),
per *block* of several chunks (``BLOCK_ELEMENTS``): a matmul of a few dozen rows
wastes most of a bf16 unit, and pushing each chunk's gradient into the float32
``[V, D]`` head buffer would rewrite that buffer once per chunk. A block's
student logits are made in one matmul, its chunks go through the float32 maths
one at a time (upcast first in bf16 / fp16), each chunk's gradient is written
back (rounded, in low precision) over the block's logits, and the block's
gradient is pushed through the head in two matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkd.losses._reduce import float32_math, mean_over
from alignkd.losses.logits import forward_kl_value_and_grad, kl_rows
from alignkd.losses.sparse import topk_buckets

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Elements of one [block rows, V] low-precision logits buffer (64 MB in bf16). A
# chunk's few rows make matmuls too small to run at speed; blocks of several chunks
# keep the fused loss about as fast as full logits, and bigger blocks gain nothing.
# Never fewer rows than a chunk (on CUDA a chunk is already bigger).
BLOCK_ELEMENTS = 1 << 25
# The same in float32 (64 MB). Each push of a gradient through the head reads and
# writes the whole float32 [V, D] head-gradient buffer, so it is pushed per block,
# not per chunk.
FLOAT32_BLOCK_ELEMENTS = 1 << 24


def matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the head matmuls on ``hidden``: what the model's own head would run in.

    Autocast's dtype when autocast is on for the device (the student's head under
    mixed precision); else ``hidden``'s own when it is bf16 / fp16 (a model loaded
    in that dtype, e.g. the teacher, whose forward runs outside autocast); else float32.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype if hidden.dtype in LOW_PRECISION else torch.float32


@dataclass(frozen=True, kw_only=True)
class HeadWalk:
    """One call's walk over the student's head: everything but the three student tensors that get gradients.

    The defaults are those of a walk without a teacher, without labels and with one output;
    ``lm_head._walk`` fills in the student's side, each public function what it adds.
    """

    rows: torch.Tensor  # 1-D index of the rows walked (the KL's counted rows; CE alone: the labelled ones)
    vocab: int
    chunk_tokens: int
    needs: tuple[bool, ...]  # gradient wanted for (hidden, head, bias, lora_a, lora_b)
    dtype: torch.dtype  # of the student's head matmuls (logits and gradient pushes)
    softcap: float | None = None
    lora_scale: float = 0.0  # a LoRA adapter on the student's head: logits + lora_scale * (h A^T) B^T
    teacher_hidden: torch.Tensor | None = None  # [N, D_t], detached; None: cross-entropy only, or a top-k teacher
    teacher_head: torch.Tensor | None = None  # [vocab, D_t] in teacher_dtype, detached
    teacher_bias: torch.Tensor | None = None  # [vocab] in teacher_dtype
    teacher_dtype: torch.dtype = torch.float32  # of the teacher's head matmul
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """A teacher from a cache instead of hidden states and head: ``[N, k]`` long ids,
    ``[N, k]`` log-probabilities, ``[N]`` tail log-mass."""
    kind: str = "forward"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    labels: torch.Tensor | None = None  # [N] long (negative = not counted), None without CE
    n_ce: int = 0  # rows counted by the cross-entropy
    ce_weight: float = 0.0  # weight of the CE in the single output; 1 when split
    split: bool = False  # two outputs (KL, CE) with their own gradients, instead of KL + ce_weight * CE

    @property
    def has_teacher(self) -> bool:
        return self.teacher_hidden is not None or self.teacher_topk is not None


INPUTS = 5  # the student tensors that may get a gradient: hidden, head, bias, lora_a, lora_b


class HeadLoss(torch.autograd.Function):
    """``apply(hidden, head, bias, walk, lora_a=None, lora_b=None)`` -> a tuple of float32 scalars (one, or
    (KL, CE) when split). ``lora_a`` ``[r, D]`` and ``lora_b`` ``[V, r]``: a LoRA adapter on the head, whose
    update ``walk.lora_scale * B @ A`` is applied per block of rows as two thin matmuls (never a ``[V, D]``
    matrix)."""

    @staticmethod
    def forward(ctx, hidden, head, bias, walk: HeadWalk, lora_a=None, lora_b=None):
        with float32_math(hidden):  # the dtypes are the walk's, not autocast's
            values, grads = _evaluate(hidden, head, bias, walk, lora_a, lora_b)
        ctx.save_for_backward(*(g for per_output in grads for g in per_output))
        return tuple(values)

    @staticmethod
    def backward(ctx, *grad_outs):
        saved = ctx.saved_tensors
        total: list[torch.Tensor | None] = [None] * INPUTS
        for i in range(INPUTS):
            parts = [(saved[INPUTS * k + i], go) for k, go in enumerate(grad_outs) if saved[INPUTS * k + i] is not None]
            # An output that does not reach the loss (a split call's unused half) adds
            # nothing; the first one stays so that a gradient of zeros still flows.
            parts = [(g, go) for g, go in parts if not bool(go == 0)] or parts[:1]
            for g, go in parts:
                # The usual caller backpropagates the loss itself (grad_out == 1): hand the
                # buffers over as they are instead of allocating scaled copies.
                g = g if bool(go == 1) else g * go.to(g.dtype)
                total[i] = g if total[i] is None else total[i] + g
        hidden, head, bias, lora_a, lora_b = total
        return hidden, head, bias, None, lora_a, lora_b


@dataclass
class _Lora:
    """A LoRA adapter on the student's head, in the walk's dtype: ``a`` ``[r, D]``, ``b`` ``[vocab, r]``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


class _Grads:
    """float32 gradient buffers of one output w.r.t. (hidden ``[N, D]``, head, bias, lora_a, lora_b)."""

    def __init__(self, h: torch.Tensor, head: torch.Tensor, bias, needs: tuple[bool, ...], lora_a=None, lora_b=None):
        f32 = {"dtype": torch.float32, "device": h.device}
        self.h = torch.zeros(h.shape, **f32) if needs[0] else None
        self.w = torch.zeros(head.shape, **f32) if needs[1] else None
        self.b = torch.zeros(bias.shape, **f32) if needs[2] else None
        self.la = torch.zeros(lora_a.shape, **f32) if needs[3] else None
        self.lb = torch.zeros(lora_b.shape, **f32) if needs[4] else None

    def push(self, g, idx, hs, w, unscale: float, lora: _Lora | None = None, u=None) -> None:
        """Add the gradient ``g`` ``[rows, vocab]`` w.r.t. the logits of rows ``idx`` (hidden ``hs``; with an
        adapter, ``u`` = ``scale * hs @ A^T`` ``[rows, r]``). In float32 straight into the buffers, no temporaries."""
        vocab = g.shape[1]
        f32 = g.dtype == torch.float32
        gb = g @ lora.b if lora is not None else None  # [rows, r]: the gradient at the adapter's rank
        if self.h is not None:
            gh = g @ w
            if lora is not None:  # d/dh of scale * (h A^T) B^T
                gh.addmm_(gb, lora.a, alpha=lora.scale)
            self.h.index_copy_(0, idx, gh if f32 else gh.float().mul_(unscale))
        if self.w is not None:
            if f32:
                self.w[:vocab].addmm_(g.T, hs)
            else:
                self.w[:vocab].add_(g.T @ hs, alpha=unscale)
        if self.la is not None:  # d/dA = scale * (g B)^T h
            if f32:
                self.la.addmm_(gb.T, hs, alpha=lora.scale)
            else:
                self.la.add_(gb.T @ hs, alpha=lora.scale * unscale)
        if self.lb is not None:  # d/dB = g^T (scale * h A^T)
            if f32:
                self.lb[:vocab].addmm_(g.T, u)
            else:
                self.lb[:vocab].add_(g.T @ u, alpha=unscale)

    def out(self, hidden, head, bias, lora_a=None, lora_b=None) -> list[torch.Tensor | None]:
        pairs = ((self.h, hidden), (self.w, head), (self.b, bias), (self.la, lora_a), (self.lb, lora_b))
        out = [None if buf is None else buf.to(like.dtype) for buf, like in pairs]
        if out[0] is not None:
            out[0] = out[0].reshape(hidden.shape)
        return out


def _block_rows(n: int, p: HeadWalk) -> int:
    """Rows per block of head matmuls: about ``BLOCK_ELEMENTS // vocab`` (``FLOAT32_BLOCK_ELEMENTS``
    in float32), never fewer than a chunk, evened out over the blocks (no ragged little last one)."""
    elements = BLOCK_ELEMENTS if p.dtype in LOW_PRECISION else FLOAT32_BLOCK_ELEMENTS
    most = max(p.chunk_tokens, elements // p.vocab, 1)
    blocks = max(1, -(-n // most))
    return max(1, -(-n // blocks))


def _evaluate(
    hidden, head, bias, p: HeadWalk, lora_a=None, lora_b=None
) -> tuple[list[torch.Tensor], list[list[torch.Tensor | None]]]:
    """The outputs and, per output, their gradients w.r.t. (hidden, head, bias, lora_a, lora_b)."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = head.detach()[: p.vocab].to(p.dtype)  # a view when the head is already in that dtype
    b = None if bias is None else bias.detach()[: p.vocab].to(p.dtype)
    lora = None
    if lora_a is not None:
        lora = _Lora(lora_a.detach().to(p.dtype), lora_b.detach()[: p.vocab].to(p.dtype), p.lora_scale)
    want_grad = any(p.needs)
    grads = [_Grads(h, head, bias, p.needs, lora_a, lora_b) for _ in range(2 if p.split else 1)]
    low = p.dtype in LOW_PRECISION
    n = p.rows.numel()
    # fp16: push the gradient of the loss *sum* (entries O(1)) and divide after the
    # matmul; that of the mean has most entries below fp16's smallest normal (6e-5).
    # A power of two, so the scaling is exact. bf16 has float32's range.
    scale = float(2 ** (max(n, 1).bit_length() - 1)) if p.dtype == torch.float16 else 1.0
    f32 = {"dtype": torch.float32, "device": h.device}
    kl_sum, ce_sum = torch.zeros((), **f32), torch.zeros((), **f32)
    block = _block_rows(n, p)

    for start in range(0, n, block):
        blk = p.rows[start : start + block]
        hs = h.index_select(0, blk).to(p.dtype)
        zs_blk = F.linear(hs, w, b)  # [rows, vocab] in p.dtype
        u = None
        if lora is not None:  # the adapter's update through its rank: [rows, r], then [rows, vocab]
            u = F.linear(hs, lora.a).mul_(lora.scale)
            zs_blk.addmm_(u, lora.b.T)
        zt_blk = None
        if p.teacher_hidden is not None:
            zt_blk = F.linear(p.teacher_hidden.index_select(0, blk).to(p.teacher_dtype), p.teacher_head, p.teacher_bias)
        # Each chunk's gradient (rounded in low precision) overwrites the block's logits
        # once they are read; the CE of a split call gets a buffer of its own. A block of
        # one chunk pushes its gradient straight.
        g_blks = None
        if want_grad and (low or blk.numel() > p.chunk_tokens):
            g_blks = [zs_blk] + [torch.empty_like(zs_blk) for _ in grads[1:]]
        for j in range(0, blk.numel(), p.chunk_tokens):
            sl = slice(j, j + p.chunk_tokens)
            zs = _capped(zs_blk[sl].float(), p.softcap)
            zt = None if zt_blk is None else _capped(zt_blk[sl].float(), p.softcap)
            if p.teacher_topk is not None:
                zt = tuple(t.index_select(0, blk[sl]) for t in p.teacher_topk)
            kl, ce, gs = _chunk(
                zs, zt, None if p.labels is None else p.labels.index_select(0, blk[sl]), p, want_grad, n
            )
            kl_sum += kl
            ce_sum += ce
            for k, g in enumerate(gs):
                if p.softcap is not None:  # chain rule through cap * tanh(z / cap): 1 - tanh^2
                    g.mul_(1.0 - (zs / p.softcap).square())
                if grads[k].b is not None:
                    grads[k].b[: p.vocab] += g.sum(0)
                if g_blks is None:
                    grads[k].push(g, blk[sl], hs[sl], w, 1.0, lora, None if u is None else u[sl])
                else:
                    g_blks[k][sl].copy_(g if scale == 1.0 else g.mul_(scale))
        if g_blks is not None:
            for k, g_blk in enumerate(g_blks):
                grads[k].push(g_blk, blk, hs, w, 1.0 / scale, lora, u)
        # Freed before the next block's are made, not after: one block's logits alive at a time.
        del zs_blk, zt_blk, g_blks, u

    kl_mean, ce_mean = mean_over(kl_sum, n if p.has_teacher else 0), mean_over(ce_sum, p.n_ce)
    values = [kl_mean, ce_mean] if p.split else [kl_mean + p.ce_weight * ce_mean]
    return values, [g.out(hidden, head, bias, lora_a, lora_b) for g in grads]


def _chunk(zs, zt, labels, p: HeadWalk, want_grad: bool, n: int):
    """One chunk's summed KL and CE and the gradients w.r.t. its (capped) student logits:
    one per output, each already divided by its count (and CE weighted)."""
    kl = zs.new_zeros(())
    g = None
    if zt is not None:
        kl, g = _kl_and_grad(zs, zt, p, want_grad)
        if g is not None:
            g.div_(n)
    ce, g_ce = zs.new_zeros(()), None
    if labels is not None:
        scale = p.ce_weight / max(p.n_ce, 1)
        if p.split:
            ce, g_ce = _add_ce(zs, labels, None, scale, want_grad)
        else:
            ce, g = _add_ce(zs, labels, g, scale, want_grad)
    if not want_grad:
        return kl, ce, []
    if g is None:  # no teacher and no labelled row: a gradient of zeros
        g = torch.zeros_like(zs)
    return kl, ce, [g, g_ce if g_ce is not None else torch.zeros_like(zs)] if p.split else [g]


def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is not None:
        z = torch.tanh(z.div_(softcap)).mul_(softcap)
    return z


def _kl_and_grad(zs: torch.Tensor, zt, p: HeadWalk, want_grad: bool):
    """Summed divergence of the chunk and its gradient w.r.t. the (capped) student logits.

    ``zt``: the teacher's logits ``[rows, vocab]``, or its top-k ``(ids, log-probabilities,
    tail)`` (``sparse_kl``'s buckets; their gradient w.r.t. the logits is in closed form).
    """
    if isinstance(zt, tuple):

        def rows(z):
            s, t = topk_buckets(z, *zt, p.temperature)
            return kl_rows(s, t, kind=p.kind, beta=p.beta, alpha=p.alpha) * p.temperature**2
    else:

        def rows(z):
            return kl_rows(z, zt, kind=p.kind, temperature=p.temperature, beta=p.beta, alpha=p.alpha)

    if not want_grad:
        return rows(zs).sum(), None
    if p.kind == "forward" and not isinstance(zt, tuple):  # closed form T * (p_S - p_T), as kl_div does
        per, g = forward_kl_value_and_grad(p.temperature)(zs, zt)
        return per.sum(), g
    leaf = zs.detach().requires_grad_(True)
    with torch.enable_grad():
        value = rows(leaf).sum()
    (g,) = torch.autograd.grad(value, leaf)
    return value.detach(), g


def _add_ce(zs: torch.Tensor, labels: torch.Tensor, g: torch.Tensor | None, scale: float, want_grad: bool):
    """Summed cross-entropy of the chunk's labelled rows, and ``g`` plus ``scale`` times its gradient
    (``g`` None: zeros; the CE gradient itself is then the chunk's, with no buffer to fill and add to)."""
    sel = (labels >= 0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return zs.new_zeros(()), g
    every = sel.numel() == labels.numel()  # the usual case: no row copy, no scatter back
    # Advanced indexing, not index_select: on a CPU, index_select of a few rows of a wide
    # [rows, V] tensor is tens of times slower than indexing.
    z = zs if every else zs[sel]
    tgt = labels[sel].unsqueeze(1)
    logp = z.log_softmax(-1)
    ce = -logp.gather(1, tgt).sum()
    if want_grad:  # d/dz of -log softmax(z)[y] = softmax(z) - onehot(y)
        d = logp.exp_().scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=z.dtype)).mul_(scale)
        if every:
            g = d if g is None else g.add_(d)
        else:
            g = torch.zeros_like(zs) if g is None else g
            g.index_put_((sel,), d, accumulate=True)
    return ce, g
