"""Which examples go where: the seeded train/eval hold-out and the resumable batch order."""

from __future__ import annotations

import torch

from alignkd.errors import DataError


def split_indices(n: int, eval_fraction: float, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded shuffle of ``range(n)`` -> (train indices, eval indices); eval gets max(1, round(f*n))."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction is {eval_fraction}; set it in [0, 1)")
    if eval_fraction == 0.0:
        return torch.arange(n), torch.arange(0)
    if n < 2:
        raise DataError(
            f"{what}; holding out eval data needs 2: add data, give data.eval, or set data.eval_fraction to 0"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    return order[n_eval:], order[:n_eval]


class BlockSampler:
    """Deterministic, resumable order over N examples.

    An epoch is a permutation from ``torch.Generator(seed + epoch)``; the position
    (epoch, global batches taken) is saved by :meth:`state_dict` and restored by
    :meth:`load_state_dict`, so a resumed run draws the same batches.

    Each global batch is ``batch_size * world_size`` consecutive entries of the
    epoch's permutation; rank ``r`` takes slice ``r``, so ranks see disjoint
    examples. The incomplete last global batch of an epoch is dropped. With fewer
    examples than one global batch, every epoch is a single global batch that
    wraps around its permutation (examples then repeat, across ranks too).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise DataError("the sampler got 0 examples; the training data is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; set it to at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = max(1, num_examples // self.global_batch)
        self.epoch, self.position = 0, 0  # position: global batches already taken this epoch
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) cache

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.num_examples, generator=g))
        return self._perm[1]

    def next_indices(self) -> torch.Tensor:
        """This rank's example indices for the next step: LongTensor ``[batch_size]``."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        slots = torch.arange(start, start + self.batch_size) % self.num_examples
        self.position += 1
        return self._permutation()[slots]

    def state_dict(self) -> dict:
        """``{"epoch": int, "position": int}``: where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not {"epoch", "position"} <= set(state):
            raise ValueError(
                f"sampler state needs 'epoch' and 'position', got {sorted(state)}; pass state_dict() output"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"sampler state {state} does not fit {self.batches_per_epoch} batches per epoch; "
                "resume with the same data, batch size and world size"
            )
        self.epoch, self.position = epoch, position
