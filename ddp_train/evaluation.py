"""Exact distributed evaluation: each sample counted once, the same figures for any world size."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import CLASSIFICATION
from .dist import Comm
from .metrics import loss_fn, make_metrics


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
        self._metrics = None  # built on first use: importing torchmetrics is slow

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, outputs: list | None = None) -> dict[str, float]:
        """Metrics over the whole split. With `outputs`, also collects (chunk id, model outputs)."""
        if self._metrics is None:
            self._metrics = make_metrics(self.task, self.num_outputs, self.device)
        metrics, lossf = self._metrics, loss_fn(self.task)
        metrics.reset()
        was_training = model.training
        model.eval()
        # One float64 loss sum per global chunk: each has exactly one non-zero contributor, so the
        # all-reduce is exact and the final sum runs in the same order for any world size.
        chunk_loss = torch.zeros(self.chunks.num_chunks, dtype=torch.float64, device=self.device)
        for chunk_id, (x, y) in zip(self.chunks.chunk_ids(), self.loader):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                out = model(x)
            out = out.float()
            chunk_loss[chunk_id] = lossf(out, y, reduction="sum").double()
            if self.task == CLASSIFICATION:
                metrics.update(out, y)
            else:
                metrics.update(out.view_as(y).reshape(len(y), -1).squeeze(-1), y.reshape(len(y), -1).squeeze(-1))
            if outputs is not None:
                outputs.append((chunk_id, out.cpu()))
        model.train(was_training)
        self.comm.all_reduce_sum(chunk_loss)
        results = {"val_loss": chunk_loss.sum().item() / self.chunks.n}
        results.update({k: float(v) for k, v in metrics.compute().items()})
        return results
