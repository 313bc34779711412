"""Exact distributed evaluation: each sample counted once, the same figures for any world size."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.data import DataLoader

from .dist import Comm
from .metrics import Statistics


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Evaluator:
    def __init__(self, loader: DataLoader, task: str, num_outputs: int, device: torch.device,
                 comm: Comm, precision: str = "32"):
        self.loader, self.task, self.device, self.comm, self.precision = loader, task, device, comm, precision
        self.num_outputs = num_outputs
        self.chunks = loader.sampler if loader.batch_sampler is None else loader.batch_sampler

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, outputs: list | None = None) -> dict[str, float]:
        """Metrics over the whole split. With `outputs`, also collects (chunk id, model outputs)."""
        stats = Statistics(self.task, self.num_outputs, self.chunks.num_chunks, self.device)
        was_training = model.training
        model.eval()
        for chunk_id, (x, y) in zip(self.chunks.chunk_ids(), self.loader):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                out = model(x)
            stats.update(chunk_id, out, y)
            if outputs is not None:
                outputs.append((chunk_id, out.float().cpu()))
        model.train(was_training)
        self.comm.all_reduce_sum(stats.tensor)
        return stats.compute(self.chunks.n)
