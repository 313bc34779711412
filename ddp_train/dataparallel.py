"""DataParallel (one process, several GPUs), made to train like DDP: the same precision in every
replica and the same loss for a Task whose model returns its own loss.

torch's DataParallel runs each replica in a thread of its own, and a thread starts with the default
autocast dtype (float16 on CUDA): `Autocast` enters the run's dtype inside each replica's forward.
It gathers the replicas' outputs along dim 0, which turns scalar losses into a vector of
per-replica means: `ReplicaParallel` gathers a scalar as the mean over all samples instead
(each replica's mean weighted by its share of the batch), and tensors as torch does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .batch import count


class Autocast(nn.Module):
    """`module` under autocast to `dtype`, in whichever thread runs its forward."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next(self.module.parameters(), torch.empty(0)).device.type
        with torch.autocast(device_type=device, dtype=self.dtype):
            return self.module(*args, **kwargs)


def combine(outputs: Sequence[Any], weights: Sequence[int], device: torch.device | int | str, dim: int = 0) -> Any:
    """The replicas' outputs as one: tensors concatenated along `dim` on `device`; scalars (a
    loss, a count) as the mean over samples, `weights` holding each replica's samples; tuples,
    lists and dicts item by item. Differentiable across devices."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        parts = [o.to(device) for o in outputs]
        if first.dim() == 0:
            total = sum(weights)
            return sum(p * (w / total) for p, w in zip(parts, weights))
        return torch.cat(parts, dim)
    if isinstance(first, dict):
        return type(first)((k, combine([o[k] for o in outputs], weights, device, dim)) for k in first)
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
        return type(first)(*(combine(items, weights, device, dim) for items in zip(*outputs)))
    if isinstance(first, (list, tuple)):
        return type(first)(combine(items, weights, device, dim) for items in zip(*outputs))
    return first


class ReplicaParallel(nn.DataParallel):
    """nn.DataParallel whose replicas compute in `dtype` (None: no autocast) and whose scalar
    outputs are sample-weighted means (see `combine`)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
        super().__init__(Autocast(module, dtype) if dtype is not None else module)
        self._samples: list[int] = []

    def scatter(self, inputs: Any, kwargs: Any, device_ids: Sequence[int | torch.device]) -> Any:
        inputs, kwargs = super().scatter(inputs, kwargs, device_ids)
        self._samples = [count((i, k)) or 1 for i, k in zip(inputs, kwargs)]
        return inputs, kwargs

    def gather(self, outputs: Sequence[Any], output_device: Any) -> Any:
        return combine(outputs, self._samples, torch.device("cuda", output_device) if isinstance(output_device, int)
                       else output_device, getattr(self, "dim", 0))
