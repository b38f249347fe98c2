"""Training rows from several places (tensors in memory, arrays memory-mapped from disk) indexed as one tensor.

A classification run's training set may be its labelled examples followed by
their augmented variants and by labelled unlabelled text, the last two written
to disk once and read back row by row (:mod:`alignkd.engine.augment`).
"""

from __future__ import annotations

import numpy as np
import torch


class Rows:
    """``[N_1 + N_2 + ..., ...]`` over ``parts`` (each a tensor or NumPy array with the same trailing shape).

    ``x[idx]`` (a 1-D LongTensor, list or array of row indices) reads only those
    rows, in that order, and returns a tensor of the first part's dtype.
    """

    def __init__(self, *parts):
        if not parts:
            raise ValueError("Rows needs at least one part")
        self.parts = parts
        self.dtype = parts[0].dtype if isinstance(parts[0], torch.Tensor) else torch.from_numpy(parts[0][:0]).dtype
        self.ends = np.cumsum([len(p) for p in parts])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.ends[-1]), *self.parts[0].shape[1:]))

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        idx = np.asarray(torch.as_tensor(idx, dtype=torch.long).reshape(-1))
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        part = np.searchsorted(self.ends, idx, side="right")
        out = torch.empty((len(idx), *self.parts[0].shape[1:]), dtype=self.dtype)
        for k in np.unique(part):
            where = np.nonzero(part == k)[0]
            local = idx[where] - (self.ends[k - 1] if k > 0 else 0)
            rows = self.parts[k][torch.as_tensor(local)] if isinstance(self.parts[k], torch.Tensor) else None
            if rows is None:  # NumPy (a memory map): read the rows asked for, in sorted order, then put back
                order = np.argsort(local)
                got = np.empty((len(local), *self.parts[k].shape[1:]), dtype=self.parts[k].dtype)
                got[order] = self.parts[k][local[order]]
                rows = torch.from_numpy(got)
            out[torch.as_tensor(where)] = rows.to(self.dtype)
        return out
