"""Streaming training data: a train split that is an `IterableDataset` (no length, read in order).

The stream's samples are numbered 0, 1, 2, ... in the order the data set yields them (for the
epoch given to its `set_epoch`, if it has one). Rank r takes the samples i with i % world_size == r,
cut into batches of batch_size; loader worker w of the rank builds the rank's batches j with
j % workers == w, and the DataLoader hands them out in order j = 0, 1, 2, ... So every sample is
trained on once per pass, by one rank, in an order that does not depend on the number of workers.

After B batches per rank, the first B x batch_size x world_size samples of the stream are
consumed, whatever the worker count: a resume starts there. A data set with `skip(n)` (Hugging Face
`datasets.IterableDataset` has it) jumps there; any other is read from its start and the consumed
samples are dropped. Either way the resume is exact when the data set yields the same samples in the
same order for the same epoch; a data set that shuffles with an unseeded buffer resumes at the right
count of samples, but not the same ones.

An epoch ends when any rank's share runs out (the ranks agree every step, one small all-reduce):
the other ranks' last batches of that pass, fewer than one step's, are not trained on.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .errors import UsageError


class StreamShards(IterableDataset):
    """This rank's batches of a stream, split among the loader's workers (see the module's docstring).
    Also the training loop's sampler: `set_epoch(epoch, start_batch)`, and no `num_batches`."""

    num_batches = None  # unknown: an epoch ends when the stream does

    def __init__(self, dataset: Any, batch_size: int, rank: int, world_size: int,
                 collate_fn: Callable[[list[Any]], Any] = default_collate):
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.collate_fn = collate_fn
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def samples(self) -> Iterator[Any]:
        """The stream from the first sample not yet consumed this epoch."""
        ds = self.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.epoch)
        consumed = self.start * self.batch_size * self.world_size
        if consumed and callable(getattr(ds, "skip", None)):
            return iter(ds.skip(consumed))
        return itertools.islice(iter(ds), consumed, None)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = itertools.islice(self.samples(), self.rank, None, self.world_size)
        for j in itertools.count():
            batch = list(itertools.islice(mine, self.batch_size))
            if not batch:
                return
            if j % workers == worker:
                yield self.collate_fn(batch)


def is_stream(ds: Any) -> bool:
    return isinstance(ds, IterableDataset)


def stream_loader(ds: Any, batch_size: int, rank: int, world_size: int, loader_args: dict[str, Any],
                  collate: Callable[[list[Any]], Any] | None = None) -> tuple[DataLoader, StreamShards]:
    """The training loader of a streaming split and its sampler. `loader_args` go to the
    DataLoader; its workers must not be persistent: each epoch's get that epoch and position.
    `collate`: the Task's, else torch's default."""
    shards = StreamShards(ds, batch_size, rank, world_size, collate or default_collate)
    return DataLoader(shards, batch_size=None, **loader_args), shards


def need_max_steps() -> UsageError:
    return UsageError("the training set is a stream (an IterableDataset, no length): the run's length in steps "
                      "is unknown; pass --max-steps (an epoch is then one pass over the stream, up to --epochs)")


__all__ = ["StreamShards", "is_stream", "stream_loader", "need_max_steps"]
