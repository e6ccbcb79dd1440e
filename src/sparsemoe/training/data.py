"""The order of training batches: a pure function of the epoch, so a resumed run replays it exactly.

The loop asks a :class:`Batches` for the batches of epoch ``e`` and hands each one to the loss
callable. A batch is whatever the loss understands (row indices, a list of sentence ids, a
collated dict). Because ``epoch(e)`` depends only on ``e`` (and the object's own settings), a
checkpoint need only store the epoch and the number of batches done in it.

Sharding across processes is a wrapper (:meth:`Batches.shard`): every rank walks the same global
batches and keeps its own slice of each, so ``world`` processes together see what one process sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .._validation import check_int
from .config import SEED_MAX


def minibatches(num_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled row indices, ``batch_size`` at a time (the last batch may be smaller)."""
    yield from torch.randperm(num_rows, generator=generator).split(batch_size)


class Batches:
    """The batches of each epoch. Subclasses implement :meth:`epoch` (a pure function of ``index``)."""

    def epoch(self, index: int) -> Sequence[Any]:
        """The batches of epoch ``index`` (counted from 0), in order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings that fix the order (JSON values): a checkpoint resumes only with equal ones."""
        return {}

    def shard(self, rank: int, world: int) -> Batches:
        """This order as seen by process ``rank`` of ``world``: its slice of every batch."""
        return ShardedBatches(self, rank, world)


class RandomBatches(Batches):
    """Rows ``0..num_rows-1`` reshuffled every epoch by one generator seeded with ``seed``; the last
    batch of an epoch may be smaller. Epoch ``e`` is the ``e``-th permutation that generator draws."""

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        self.num_rows = check_int("num_rows", num_rows, low=1)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.seed = check_int("seed", seed, low=0, high=SEED_MAX)
        self._generator = torch.Generator().manual_seed(seed)
        self._next = 0  # the epoch the generator draws next
        self._cache: tuple[int, list[torch.Tensor]] | None = None

    def epoch(self, index: int) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        if index < self._next:  # an earlier epoch: replay from the seed
            self._generator.manual_seed(self.seed)
            self._next = 0
        while self._next <= index:
            batches = list(minibatches(self.num_rows, self.batch_size, self._generator))
            self._next += 1
        self._cache = (index, batches)
        return batches

    def describe(self) -> dict[str, Any]:
        return {"num_rows": self.num_rows, "batch_size": self.batch_size, "seed": self.seed}


class ShardedBatches(Batches):
    """Rank ``rank``'s slice of every batch of ``inner`` (near-equal contiguous slices, like
    ``torch.tensor_split``); batches must be tensors (split on dim 0) or sequences."""

    def __init__(self, inner: Batches, rank: int, world: int) -> None:
        self.world = check_int("world", world, low=1)
        self.rank = check_int("rank", rank, low=0, high=world - 1)
        self.inner = inner

    def _slice(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.tensor_split(self.world)[self.rank]
        if isinstance(batch, Sequence):
            size, extra = divmod(len(batch), self.world)
            start = self.rank * size + min(self.rank, extra)
            return batch[start : start + size + (self.rank < extra)]
        raise TypeError(f"cannot shard a batch of type {type(batch).__name__}; give tensors or sequences")

    def epoch(self, index: int) -> list[Any]:
        return [self._slice(b) for b in self.inner.epoch(index)]

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "rank": self.rank, "world": self.world}
