"""What every benchmarked tool shares: the data (ddp_train's own generators when importable, so
every tool trains on the same tensors), the models, the workloads' sizes, and the metrics.jsonl
events that benchmarks/run.py reads (the same events `ddp-train fit` writes)."""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the checkout's ddp_train importable
    sys.path.append(str(REPO))

# Per workload: global batch, epochs, learning rate (Adam), data sizes. run.py passes the same
# numbers to `ddp-train fit`.
WORKLOADS = {
    "cnn": dict(global_batch=128, epochs=1, lr=1e-3, samples=16384, val_samples=1000),
    "digits": dict(global_batch=64, epochs=10, lr=1e-3),
    "linreg": dict(global_batch=1_000_000, epochs=50, lr=0.1, samples=1_000_000, val_samples=1000),
}


def synthetic_data(samples: int, val_samples: int) -> tuple[TensorDataset, TensorDataset]:
    """1x28x28 images, 10 classes: a random prototype per class plus noise (ddp_train's generator)."""
    try:
        from ddp_train.config import FitConfig
        from ddp_train.data import synthetic
        bundle = synthetic(FitConfig(data="synthetic", samples=samples, val_samples=val_samples))
        return TensorDataset(bundle.train.x, bundle.train.y), TensorDataset(bundle.val.x, bundle.val.y)
    except ImportError:
        pass
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(10, 1, 28, 28, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(10, (n,), generator=g)
        return TensorDataset(protos[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=g), y)

    return make(samples), make(val_samples)


def digits_data() -> tuple[TensorDataset, TensorDataset]:
    """sklearn's shipped 8x8 digits, scaled to [0, 1], the same seeded 80/20 split as ddp_train."""
    try:
        from ddp_train.config import FitConfig
        from ddp_train.data import digits
        bundle = digits(FitConfig(data="digits"))
        return TensorDataset(bundle.train.x, bundle.train.y), TensorDataset(bundle.val.x, bundle.val.y)
    except ImportError:
        pass
    import sklearn

    with gzip.open(Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        rows = torch.tensor([[float(v) for v in line.split(",")] for line in f])
    x, y = rows[:, :-1] / 16.0, rows[:, -1].long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = round(len(x) * 0.2)
    tr, va = perm[n_val:], perm[:n_val]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])


def linreg_data(samples: int, val_samples: int) -> tuple[TensorDataset, TensorDataset]:
    """y = x . [2, -3] + 10 + N(0, 2^2) (ddp_train's generator)."""
    g = torch.Generator().manual_seed(1234)

    def make(n: int) -> TensorDataset:
        x = torch.randn(n, 2, generator=g)
        return TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 10.0 + 2.0 * torch.randn(n, 1, generator=g))

    return make(samples), make(val_samples)


def load(workload: str, samples: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    spec = WORKLOADS[workload]
    if workload == "cnn":
        return synthetic_data(samples or spec["samples"], spec["val_samples"])
    if workload == "linreg":
        return linreg_data(samples or spec["samples"], spec["val_samples"])
    return digits_data()


def build_model(workload: str) -> nn.Module:
    """ddp_train's `cnn`, `mlp --hidden 128,64` and `linear` models, layer for layer."""
    if workload == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.MaxPool2d(2),
            nn.Dropout2d(0.1), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if workload == "linreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(2, 1))
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


class Log:
    """metrics.jsonl on rank 0; nothing elsewhere."""

    def __init__(self, path: Path | None, rank: int):
        self.f = None
        if path is not None and rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = path.open("w", buffering=1)

    def __call__(self, event: str, **fields) -> None:
        if self.f is not None:
            self.f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def parse(doc: str, argv: list[str] | None) -> tuple[Any, dict, int, float]:
    """A baseline script's (args, workload spec, epochs, lr) from its command line."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    spec = WORKLOADS[args.workload]
    return args, spec, args.epochs or spec["epochs"], args.lr or spec["lr"]


def add_args(p, workload: str | None = None) -> None:
    """The command-line options every baseline script takes (run.py passes the same ones)."""
    if workload:
        p.set_defaults(workload=workload)
    else:
        p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--epochs", type=int, help="default: the workload's")
    p.add_argument("--samples", type=int, help="cnn, linreg: training samples (default: the workload's)")
    p.add_argument("--lr", type=float, help="Adam's learning rate (default: the workload's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="a `train` event every N steps")
    p.add_argument("--metrics", type=Path, help="metrics.jsonl written by rank 0")
    p.add_argument("--run-dir", type=Path, help="where a tool writes its own files (checkpoints)")


class FullBatch(torch.utils.data.Dataset):
    """One item: the whole training set. A full-batch loader without per-sample collation, as a
    user writes one for full-batch regression (batch_size=None)."""

    def __init__(self, ds: TensorDataset):
        self.tensors = ds.tensors

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        return self.tensors
