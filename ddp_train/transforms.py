"""Augmentation whose randomness is a function of (seed, epoch, sample index).

Loader workers, ranks and resumes all see the same random crop for the same sample in the same
epoch: a run stopped mid-epoch and resumed, or run with another worker count, ends bit-identical.
Two ways in:
- any map-style data set is wrapped in `EpochIndexed`: each `ds[i]` runs under torch/random/numpy
  generators seeded from (seed, epoch, i), so torchvision's random transforms become exact too;
- in-memory `TensorData` sets augment whole batches at once with `padded_crop_flip`, whose
  per-sample draws come from `batch_hashes` (a counter-based hash, no generator state at all).
A Task's collate function runs under generators seeded from (seed, epoch, first index of the
batch) (`SeededCollate`). Evaluation uses the same seeding with the fixed epoch `EVAL_EPOCH`, so a
masking collator or a random `eval_step` gives the same figures on every evaluation.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .protocols import SizedDataset

MASK = 0x7FFFFFFF  # hashes stay below 2**31 so products of two fit in int64, in Python and torch alike
EVAL_EPOCH = MASK  # the "epoch" of evaluation's seeds: apart from every training epoch
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _mix(h: Any) -> Any:
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x1B873593):
        h = ((h ^ (h >> 15)) * mult) & MASK
    return h ^ (h >> 16)


def sample_hash(seed: int, epoch: int, index: int) -> int:
    """A 31-bit hash of (seed, epoch, index); `batch_hashes` computes the same for a tensor of indices."""
    return _mix(((index & MASK) * 0x01000193 + _mix((seed * 0x9E3779B1 + epoch) & MASK)) & MASK)


def batch_hashes(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    base = _mix((seed * 0x9E3779B1 + epoch) & MASK)
    return _mix(((index.long() & MASK) * 0x01000193 + base) & MASK)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's, Python's and (if imported) NumPy's global generators seeded, then
    put the previous states back: the caller's random streams are untouched."""
    cpu = torch.default_generator  # the CPU generator alone: torch.manual_seed would touch CUDA too
    torch_state, py_state = cpu.get_state(), random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    cpu.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed)
    try:
        yield
    finally:
        cpu.set_state(torch_state)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


@contextlib.contextmanager
def seeded_on(device: Any, seed: int) -> Iterator[None]:
    """`seeded`, and the CUDA generator of `device` too when it is a GPU."""
    if getattr(device, "type", "cpu") != "cuda":
        with seeded(seed):
            yield
        return
    with torch.random.fork_rng(devices=[device]), seeded(seed):
        torch.cuda.manual_seed(seed)
        yield


class EpochIndexed(Dataset):
    """Wraps a training set: the train sampler asks for `(epoch, index)`, and the sample is made
    under generators seeded from (seed, epoch, index)."""

    def __init__(self, dataset: SizedDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        epoch, index = key if isinstance(key, tuple) else (EVAL_EPOCH, key)
        with seeded(sample_hash(self.seed, epoch, index)):
            return self.dataset[index]


class Keyed(Dataset):
    """`(key, sample)` per key, so that `SeededCollate` knows which samples it batches."""

    def __init__(self, dataset: SizedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple[Any, Any]:
        return key, self.dataset[key]


class SeededCollate:
    """The Task's collate over `Keyed` samples, under generators seeded from (seed, epoch, the
    batch's first index): the same batch gets the same random masking on every run and resume,
    in any loader worker (evaluation batches are fixed by sample index, so at any world size too)."""

    def __init__(self, collate: Callable[[list[Any]], Any], seed: int):
        self.collate, self.seed = collate, seed

    def __call__(self, items: list[tuple[Any, Any]]) -> Any:
        first = items[0][0] if items else 0
        epoch, index = first if isinstance(first, tuple) else (EVAL_EPOCH, first)
        with seeded(sample_hash(self.seed, epoch, index)):
            return self.collate([sample for _, sample in items])


def padded_crop_flip(x: torch.Tensor, hashes: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """CIFAR's augmentation for a batch N,C,H,W: zero-pad by `pad`, crop back at a per-sample
    offset, and flip half of the samples; all draws from the per-sample `hashes`."""
    n, _, height, width = x.shape
    span = 2 * pad + 1
    dy, dx = hashes % span, (hashes // span) % span
    flip = (hashes // (span * span)) % 2 == 1
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device).expand(n, width)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # N,H,W,C
    return out.permute(0, 3, 1, 2).contiguous()


def image_transforms(size: int, train: bool, augment: bool,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """The ImageNet recipe: random resized crop + flip for training (when `augment`), resize +
    centre crop for evaluation; then a float tensor normalised by `mean`/`std`."""
    from torchvision.transforms import v2

    if train and augment:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(size * 8 / 7), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
