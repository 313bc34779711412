"""Validation metrics (torchmetrics, synced once per evaluation) and exact global losses."""

from __future__ import annotations

from typing import Any

import torch

from .data import CLASSIFICATION


def loss_fn(task: str):
    if task == CLASSIFICATION:
        return torch.nn.functional.cross_entropy
    return torch.nn.functional.mse_loss


def make_metrics(task: str, num_outputs: int, device: torch.device) -> Any:
    import torchmetrics  # ~3 s to import: only when the first evaluation needs it

    if task == CLASSIFICATION:
        metrics = {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_outputs),
                   "f1": torchmetrics.F1Score(task="multiclass", num_classes=num_outputs, average="macro")}
    else:
        metrics = {"mse": torchmetrics.MeanSquaredError(), "mae": torchmetrics.MeanAbsoluteError(),
                   "r2": torchmetrics.R2Score()}
    return torchmetrics.MetricCollection(metrics, prefix="val_").to(device)


def mean_from_sums(sum_count: torch.Tensor) -> float:
    """A global, sample-weighted mean from an all-reduced [sum, count] pair."""
    total, count = sum_count.tolist()
    return total / max(count, 1.0)
