"""Samplers: the global training order and the exact evaluation chunks.

Training order is DistributedSampler's, computed as index tensors (no Python list per batch):
epoch e shuffles with a generator seeded `seed + e`, pads to a multiple of the world size by
repeating the start, and rank r takes every world-size-th index from r. Batch b of every rank
together is then the contiguous block [b*B*W, (b+1)*B*W) of that order, so a step consumes the same
samples for any world size with the same global batch.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """Yields `(epoch, indices)` per batch of this rank, `indices` a LongTensor, or a slice when
    one rank's batch is the whole data set in its stored order (a full batch needs no gather:
    a batch's order changes nothing but the summation order of its mean).

    With `global_batch` (G = batch x world size x accumulation), the order is padded to a multiple
    of G instead of the world size: every step, the epoch's tail included, then consumes the same G
    samples whatever the world size."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 global_batch: int | None = None):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        multiple = global_batch or world_size
        self.num_samples = math.ceil(n / multiple) * multiple // world_size  # per rank
        self.num_batches = math.ceil(self.num_samples / batch_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, as DistributedSampler(shuffle=True) gives them."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.num_samples * self.world_size
        if total > self.n:
            perm = perm.repeat(math.ceil(total / self.n))[:total]
        return perm[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | slice]]:
        epoch = self.epoch
        if self.world_size == 1 and self.batch_size >= self.n == self.num_samples:
            if self.start == 0:
                yield epoch, slice(0, self.n)
            return
        indices = self.order(epoch)
        for b in range(self.start, self.num_batches):
            yield epoch, indices[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.num_batches - self.start


class PerSample(Sampler):
    """A TrainSampler's batches as lists of `(epoch, index)` keys, for data sets indexed one
    sample at a time (wrapped in transforms.EpochIndexed)."""

    def __init__(self, sampler: TrainSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, indices in self.sampler:
            if isinstance(indices, slice):
                indices = torch.arange(indices.start, indices.stop)
            yield [(epoch, i) for i in indices.tolist()]

    def __len__(self) -> int:
        return len(self.sampler)


class EvalChunks(Sampler):
    """Splits the data set into fixed global chunks of `batch_size` and deals them round-robin to
    ranks: every sample is seen by exactly one rank, and each chunk is computed identically for
    any world size, so evaluation equals a single-process evaluation bit for bit. Yields slices
    (in-memory data: views, no copy) or lists of indices (`as_lists`)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, as_lists: bool = False):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.as_lists = as_lists
        self.num_chunks = math.ceil(n / batch_size)

    def chunk_ids(self) -> range:
        return range(self.rank, self.num_chunks, self.world_size)

    def __iter__(self) -> Iterator[slice | list[int]]:
        for c in self.chunk_ids():
            chunk = slice(c * self.batch_size, min((c + 1) * self.batch_size, self.n))
            yield list(range(chunk.start, chunk.stop)) if self.as_lists else chunk

    def __len__(self) -> int:
        return len(self.chunk_ids())
