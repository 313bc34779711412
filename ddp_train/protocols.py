"""Structural types the modules share: what a data set or a sampler must offer, not what it is."""

from __future__ import annotations

from typing import Any, Protocol


class SizedDataset(Protocol):
    """A map-style data set: `len()` and indexing (torch's `Dataset` promises only the indexing)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> Any: ...


class EpochSampler(Protocol):
    """The training loop's sampler: batches per epoch (None for a stream, whose epoch ends when the
    stream does), and where to start an epoch (a resume starts mid-epoch)."""

    @property
    def num_batches(self) -> int | None: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...
