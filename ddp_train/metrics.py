"""Exact validation metrics.

Built-in statistics (accuracy and macro F1 from a confusion matrix; MSE, MAE and R2 from per-chunk
sums) are all-reduced with the loss in one tensor, without importing torchmetrics (its import pulls
in scipy and costs seconds, more than a whole default run trains). Any torchmetrics metric is made
exact by `ChunkedMetric`: its state is taken per evaluation chunk and merged in chunk order, so the
figure is the same, to the bit, for any world size.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import CLASSIFICATION, REGRESSION
from .errors import UsageError


class ClassificationStats:
    names = ("acc", "f1")

    def __init__(self, num_classes: int, num_chunks: int, device: torch.device):
        self.k = num_classes
        self.tensor = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)

    def update(self, chunk: int, out: torch.Tensor, y: torch.Tensor) -> None:
        pairs = y * self.k + out.argmax(1)
        # index_add_, not bincount: CUDA's bincount reads the largest value back to size its
        # output (a host sync per chunk); counts of ones in float64 are exact in any order.
        self.tensor.index_add_(0, pairs, torch.ones(pairs.shape, dtype=torch.float64, device=pairs.device))

    def compute(self) -> dict[str, float]:
        cm = self.tensor.view(self.k, self.k)
        tp = cm.diag()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)
        present = (tp + fp + fn) > 0  # torchmetrics' macro average skips absent classes
        return {"acc": (tp.sum() / cm.sum()).item(), "f1": (f1[present].sum() / present.sum().clamp(min=1)).item()}


class RegressionStats:
    names = ("mse", "mae", "r2")

    def __init__(self, num_outputs: int, num_chunks: int, device: torch.device):
        self.k, self.num_chunks = num_outputs, num_chunks
        # (n, sum of squared errors, sum of absolute errors, sum y, sum y^2) per chunk and output
        self.tensor = torch.zeros(num_chunks * 5 * num_outputs, dtype=torch.float64, device=device)

    def update(self, chunk: int, out: torch.Tensor, y: torch.Tensor) -> None:
        out, y = out.reshape(len(y), -1).double(), y.reshape(len(y), -1).double()
        err = out - y
        sums = torch.stack([err * err, err.abs(), y, y * y]).sum(1)  # one reduction for the four sums
        start = chunk * 5 * self.k
        self.tensor[start:start + self.k] = len(y)
        self.tensor[start + self.k:start + 5 * self.k] = sums.flatten()

    def compute(self) -> dict[str, float]:
        """After the all-reduce: sums run in chunk order, so any world size gives the same bits."""
        chunks = self.tensor.view(self.num_chunks, 5, self.k)
        total = chunks[0]
        for c in range(1, self.num_chunks):
            total = total + chunks[c]
        count, sse, sae, sy, syy = total.unbind(0)
        sst = syy - sy ** 2 / count
        n = count.sum()
        mse, mae, r2 = torch.stack([sse.sum() / n, sae.sum() / n, (1 - sse / sst).mean()]).tolist()
        return {"mse": mse, "mae": mae, "r2": r2}


# --metrics names for the built-in tasks: torchmetrics classes and their arguments.
NAMED: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    CLASSIFICATION: {
        "auroc": ("MulticlassAUROC", {}), "ap": ("MulticlassAveragePrecision", {}),
        "top3": ("MulticlassAccuracy", {"top_k": 3}), "top5": ("MulticlassAccuracy", {"top_k": 5}),
        "precision": ("MulticlassPrecision", {"average": "macro"}),
        "recall": ("MulticlassRecall", {"average": "macro"}),
    },
    REGRESSION: {"explained_variance": ("ExplainedVariance", {}),
                   "mape": ("MeanAbsolutePercentageError", {})},
}


def named_metrics(names: str, kind: str, num_outputs: int) -> dict[str, Any]:
    """torchmetrics metrics for `--metrics a,b` (imports torchmetrics only when asked)."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = NAMED[kind]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UsageError(f"--metrics {','.join(unknown)}: not a metric of a {kind} run; choose from "
                         f"{', '.join(known)} (or write a Task with your own metrics())")
    import torchmetrics

    out = {}
    for name in wanted:
        cls_name, kwargs = known[name]
        if kind == CLASSIFICATION:
            kwargs = {"num_classes": num_outputs, **kwargs}
            if kwargs.get("top_k", 1) > num_outputs:
                raise UsageError(f"--metrics {name}: needs more than {num_outputs} classes")
        out[name] = getattr(torchmetrics, cls_name, None) or getattr(torchmetrics.classification, cls_name)
        out[name] = out[name](**kwargs)
    return out


class ChunkedMetric:
    """A torchmetrics metric evaluated chunk by chunk: `update` records the state one chunk gives,
    `compute` merges every chunk's state in chunk order and computes once."""

    MERGES = ("sum", "cat", "max", "min")

    def __init__(self, name: str, metric: Any):
        self.name, self.metric = name, metric
        self.metric.sync_on_compute = False  # we merge the states ourselves, exactly
        self.metric._to_sync = False
        for attr, fx in metric._reductions.items():
            if _reduction_name(fx) not in self.MERGES:
                raise UsageError(f"metric {name} ({type(metric).__name__}) keeps state {attr!r} with a custom "
                                 "reduction that cannot be merged exactly; use a metric whose states are "
                                 "summed, concatenated, or max/min-reduced")

    def chunk_state(self, out: Any, target: Any) -> dict[str, Any]:
        """The state this chunk gives, on the metric's device (reset() makes new state tensors, so
        these stay as they are); `cpu_states` moves them all once, after the last chunk."""
        self.metric.reset()
        self.metric.update(out, target)
        state = {}
        for attr in self.metric._defaults:
            value = getattr(self.metric, attr)
            state[attr] = list(value) if isinstance(value, list) else value
        return state

    def compute(self, states: list[dict[str, Any]]) -> float | torch.Tensor:
        """`states` in chunk order (all chunks of all ranks)."""
        m = self.metric
        m.reset()
        for attr, fx in m._reductions.items():
            how, values = _reduction_name(fx), [s[attr] for s in states]
            if how == "cat":
                merged: Any = [t for v in values for t in (v if isinstance(v, list) else [v])]
                merged = [torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t[None] for t in merged])] if merged else []
            else:
                merged = values[0]
                for v in values[1:]:
                    merged = merged + v if how == "sum" else torch.maximum(merged, v) if how == "max" \
                        else torch.minimum(merged, v)
            setattr(m, attr, [t.to(m.device) for t in merged] if isinstance(merged, list) else merged.to(m.device))
        m._update_count = max(len(states), 1)
        m._computed = None
        value = m.compute()
        return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def cpu_states(states: Any) -> Any:
    """Every tensor of the recorded chunk states on the CPU (to travel in a gather_object)."""
    if isinstance(states, torch.Tensor):
        return states.cpu()
    if isinstance(states, dict):
        return {k: cpu_states(v) for k, v in states.items()}
    if isinstance(states, (list, tuple)):
        return type(states)(cpu_states(v) for v in states)
    return states


def _reduction_name(fx: Any) -> str:
    return getattr(fx, "__name__", str(fx)).replace("dim_zero_", "")
