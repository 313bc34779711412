"""Exact validation metrics from sufficient statistics, synced in one all-reduce per evaluation.

Classification keeps a confusion matrix (accuracy, macro F1); regression keeps per-chunk sums
(MSE, MAE, R2). The figures match torchmetrics' (tests check that), without importing it: its
import pulls in scipy and costs 3-13 s on a 2-core machine, more than a whole default run trains.
"""

from __future__ import annotations

import torch

CLASSIFICATION, REGRESSION = "classification", "regression"


def loss_fn(task: str):
    if task == CLASSIFICATION:
        return torch.nn.functional.cross_entropy
    return torch.nn.functional.mse_loss


class Statistics:
    """Per-evaluation state. `tensor` is what the ranks all-reduce (float64: counts stay exact)."""

    def __init__(self, task: str, num_outputs: int, num_chunks: int, device: torch.device):
        self.task, self.k, self.num_chunks = task, num_outputs, num_chunks
        size = num_outputs * num_outputs if task == CLASSIFICATION else num_chunks * 5 * num_outputs
        # [loss per chunk | confusion matrix, or (n, sse, sae, sum y, sum y^2) per chunk and output]
        self.tensor = torch.zeros(num_chunks + size, dtype=torch.float64, device=device)

    def update(self, chunk: int, out: torch.Tensor, y: torch.Tensor) -> None:
        out = out.float()
        if self.task == CLASSIFICATION:
            self.tensor[chunk] = torch.nn.functional.cross_entropy(out, y, reduction="sum").double()
            pairs = y * self.k + out.argmax(1)
            self.tensor[self.num_chunks:] += torch.bincount(pairs, minlength=self.k * self.k).double()
            return
        out, y = out.reshape(len(y), -1).double(), y.reshape(len(y), -1).double()
        self.tensor[chunk] = ((out - y) ** 2).sum()
        err = out - y
        stats = torch.stack([torch.full_like(y[0], len(y)), (err ** 2).sum(0), err.abs().sum(0), y.sum(0),
                             (y ** 2).sum(0)])
        start = self.num_chunks + chunk * 5 * self.k
        self.tensor[start:start + 5 * self.k] = stats.flatten()

    def compute(self, n: int) -> dict[str, float]:
        """After the all-reduce: sums run in chunk order, so any world size gives the same bits."""
        results = {"val_loss": self.tensor[:self.num_chunks].sum().item() / n}
        if self.task == CLASSIFICATION:
            cm = self.tensor[self.num_chunks:].view(self.k, self.k)
            tp = cm.diag()
            fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
            f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)
            present = (tp + fp + fn) > 0  # torchmetrics' macro average skips absent classes
            results["val_acc"] = (tp.sum() / cm.sum()).item()
            results["val_f1"] = (f1[present].sum() / present.sum().clamp(min=1)).item()
            return results
        chunks = self.tensor[self.num_chunks:].view(self.num_chunks, 5, self.k)
        count, sse, sae, sy, syy = torch.zeros_like(chunks[0]).unbind(0)
        for c in range(self.num_chunks):
            count, sse, sae, sy, syy = (a + b for a, b in zip((count, sse, sae, sy, syy), chunks[c].unbind(0)))
        sst = syy - sy ** 2 / count
        results["val_mse"] = (sse.sum() / count.sum()).item()
        results["val_mae"] = (sae.sum() / count.sum()).item()
        results["val_r2"] = (1 - sse / sst).mean().item()
        return results
