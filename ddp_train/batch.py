"""Batches of any structure: tensors, or tuples, lists and mappings of them, nested (a Hugging Face
collator's BatchEncoding is a mapping, not a dict: it is moved as a plain dict)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def move_to(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Every tensor in `batch` on `device` (non-blocking from pinned memory); 4-D float tensors in
    channels_last layout when asked."""
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():  # one copy, in the new layout
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device, channels_last) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, channels_last) for v in batch)
    return batch


def count(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (depth-first), for sample-weighted means."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = count(value)
        if n:
            return n
    return 0


def shapes(batch: Any) -> str:
    """A short description of a batch's structure, for error messages: '(64, 10), (64,)'."""
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {shapes(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (list, tuple)):
        return ", ".join(shapes(v) for v in batch)
    return type(batch).__name__


def first_sample(loader: Any) -> Any:
    """A batch of the first sample of `loader`'s data set, built as the loader builds its batches."""
    dataset = loader.dataset
    if hasattr(dataset, "x") and hasattr(dataset, "y"):  # TensorData: slices are batches
        return list(dataset[slice(0, 1)])
    return loader.collate_fn([dataset[0]])
