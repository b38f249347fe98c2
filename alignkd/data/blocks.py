"""Packed ``[N, seq_len]`` blocks read on demand from a flat token stream, so a corpus on disk is never copied whole.

The stream is the documents' token ids with EOS after each (no BOS), int32,
often a memory-mapped file (:mod:`~alignkd.data.tokens`). Block ``i`` is
``bos_id`` (when set) then stream tokens ``[i * body, (i + 1) * body)`` with
``body = seq_len - 1`` (with BOS) or ``seq_len``: exactly what
:func:`alignkd.data.lm.pack` builds in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from alignkd.errors import DataError


def block_count(stream_tokens: int, seq_len: int, bos_id: int | None, max_tokens: int | None = None) -> int:
    """Whole blocks in a stream of ``stream_tokens``, at most ``max_tokens // seq_len`` (BOS counted) when capped."""
    lead = 0 if bos_id is None else 1
    if seq_len < 1 + lead:
        raise DataError(f"data.seq_len is {seq_len}; set it to at least {1 + lead} tokens")
    n = stream_tokens // (seq_len - lead)
    if n == 0:
        raise DataError(
            f"the text holds {stream_tokens} tokens but data.seq_len is {seq_len}; lower data.seq_len or add text"
        )
    # Cutting the packed blocks equals cutting the token stream to max_tokens first (BOS counted).
    return n if max_tokens is None else min(n, max_tokens // seq_len)


class Blocks:
    """Read-only ``[N, seq_len]`` int64 view of packed blocks over a flat int32 ``stream``.

    Indexing reads only the rows asked for: ``x[i]`` -> ``[seq_len]``, ``x[a:b]``
    -> ``[b - a, seq_len]``, ``x[idx]`` (1-D LongTensor / array / list) ->
    ``[len(idx), seq_len]``, all int64; ``x[rows, cols]`` indexes those rows'
    columns like a tensor. :meth:`select` makes a view of some rows (the
    train/eval split) without copying a block.
    """

    dtype = torch.int64

    def __init__(
        self, stream: np.ndarray, seq_len: int, bos_id: int | None, count: int, rows: torch.Tensor | None = None
    ):
        self.stream, self.seq_len, self.bos_id = stream, seq_len, bos_id
        self.body = seq_len - (bos_id is not None)  # stream tokens per block
        if count * self.body > len(stream):
            raise ValueError(f"{count} blocks of {self.body} stream tokens need more than the stream's {len(stream)}")
        self.count = count  # blocks of the stream this view may read
        self.rows = rows  # this view's row r is block rows[r]; None: row r is block r

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.count if self.rows is None else len(self.rows), self.seq_len))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = getattr(self.stream, "filename", None) or "memory"
        return f"Blocks({len(self)} x {self.seq_len}, bos={self.bos_id}, stream={where})"

    def select(self, rows: torch.Tensor) -> Blocks:
        """The view of ``rows`` (1-D LongTensor of this view's row numbers), sharing the stream."""
        rows = self._blocks_of(torch.as_tensor(rows, dtype=torch.int64))
        return Blocks(self.stream, self.seq_len, self.bos_id, self.count, rows)

    def tensor(self) -> torch.Tensor:
        """Every row, read into one ``[N, seq_len]`` int64 tensor."""
        return self[0 : len(self)]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):  # x[rows, cols]: read the rows, then index them like a tensor
            out = self[key[0]]
            return out[(slice(None),) * (out.dim() == 2) + key[1:]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if self.rows is None and step == 1:
                stop = max(start, stop)
                flat = self._mapped()[start * self.body : stop * self.body]
                return self._with_bos(np.asarray(flat).reshape(stop - start, self.body))
            key = torch.tensor(range(start, stop, step), dtype=torch.int64)
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0):
            return self[torch.tensor([int(key)])][0]
        if torch.is_tensor(key) and key.dtype == torch.bool:
            raise TypeError("Blocks take integer row indices, not a boolean mask; pass mask.nonzero().squeeze(1)")
        idx = torch.as_tensor(np.asarray(key), dtype=torch.int64) if not torch.is_tensor(key) else key.to(torch.int64)
        if idx.dim() != 1:
            raise TypeError(f"Blocks take a 1-D index, got shape {tuple(idx.shape)}")
        blocks = self._blocks_of(idx).numpy()
        starts = blocks * self.body
        return self._with_bos(self._mapped()[starts[:, None] + np.arange(self.body)])

    def _mapped(self) -> np.ndarray:
        """The stream to read from: a file stream mapped afresh, unmapped once the read is copied out.

        Pages read through one long-lived map stay in the process's resident set
        (file-backed and reclaimable, yet counted), so over a run it would reach
        the file's size; a map per read keeps it flat, for ~30 us a batch.
        """
        s = self.stream
        if isinstance(s, np.memmap) and s.filename:
            return np.memmap(s.filename, dtype=s.dtype, mode="r", offset=s.offset, shape=s.shape)
        return s

    def _blocks_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Block numbers of this view's rows ``idx`` (negative ones count from the end, as for tensors)."""
        n = len(self)
        if len(idx) and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"row index out of range for {n} blocks")
        idx = torch.where(idx < 0, idx + n, idx)
        return idx if self.rows is None else self.rows[idx]

    def _with_bos(self, body: np.ndarray) -> torch.Tensor:
        out = torch.from_numpy(body.astype(np.int64))  # int32 on disk, int64 for embeddings and losses
        if self.bos_id is None:
            return out
        return torch.cat([torch.full((out.shape[0], 1), self.bos_id, dtype=torch.int64), out], dim=1)
