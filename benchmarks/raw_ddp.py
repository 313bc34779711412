"""The baseline: the leanest correct hand-written DDP training loop, as a tutorial reader writes it.

DistributedSampler + set_epoch, DistributedDataParallel over gloo (CPU), a standard DataLoader
over a TensorDataset (per-sample __getitem__ + default collate) and a validation accuracy
all-reduced as [correct, count]. Runs under torchrun (any world size) or as plain `python` (one
process, file-store rendezvous: no port).

    torchrun --standalone --nproc_per_node=2 benchmarks/raw_ddp.py --workload cnn --metrics m.jsonl

Rank 0 writes the same `metrics.jsonl` events as ddp-train (`first_step`, `train` every
--log-every steps with global `samples`, `eval`, `end`; unix times), so that benchmarks/run.py
measures both tools with one function. Every rank prints one JSON line `{"rank", "maxrss_mb"}`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

# workload: (data set, global batch, epochs, learning rate)
WORKLOADS = {"cnn": dict(global_batch=128, epochs=1, samples=16384, val_samples=1000),
             "digits": dict(global_batch=64, epochs=10)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--epochs", type=int, help="default: the workload's (cnn 1, digits 10)")
    p.add_argument("--samples", type=int, help="cnn: training samples (default 16384)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="log (and all-reduce the loss) every N steps")
    p.add_argument("--metrics", type=Path, help="metrics.jsonl written by rank 0")
    return p.parse_args(argv)


# --- data: identical to ddp-train's when it is importable ------------------------------------------

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the checkout's ddp_train importable
    sys.path.append(str(REPO))

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


def build_model(workload: str) -> nn.Module:
    if workload == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.MaxPool2d(2),
            nn.Dropout2d(0.1), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


# --- the loop ---------------------------------------------------------------------------------------

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


def init_process_group() -> tuple[int, int]:
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
    else:  # plain python: one process
        store = Path(tempfile.mkdtemp()) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, val: TensorDataset, batch_size: int, rank: int, world_size: int) -> float:
    """Accuracy over the whole validation set: each rank takes a disjoint shard (no padding)."""
    model.eval()
    shard = Subset(val, range(rank, len(val), world_size))
    correct_count = torch.zeros(2)
    for x, y in DataLoader(shard, batch_size=batch_size):
        correct_count += torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)])
    dist.all_reduce(correct_count)
    return (correct_count[0] / correct_count[1]).item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = WORKLOADS[args.workload]
    epochs = args.epochs or spec["epochs"]
    rank, world_size = init_process_group()
    batch_size_per_rank = spec["global_batch"] // world_size
    log = Log(args.metrics, rank)

    if args.workload == "cnn":
        train, val = synthetic_data(args.samples or spec["samples"], spec["val_samples"])
    else:
        train, val = digits_data()
    torch.manual_seed(args.seed)
    model = DDP(build_model(args.workload))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=batch_size_per_rank, sampler=sampler)

    step = samples = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            samples += len(y) * world_size  # DistributedSampler gives every rank equal batches
            if step == 1:
                log("first_step")
            if step % args.log_every == 0:
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                log("train", step=step, epoch=epoch, samples=samples,
                    loss=mean_loss.item() / world_size, lr=args.lr)
        acc = evaluate(model, val, 4 * batch_size_per_rank, rank, world_size)
        log("eval", epoch=epoch, step=step, val_acc=acc)
        if rank == 0:
            print(f"epoch {epoch + 1}/{epochs} step {step} val_acc {acc:.4f}", file=sys.stderr)
    log("end", step=step)
    dist.barrier()  # nobody tears down while a peer still talks; then free DDP's hold on the group
    del model, optimizer
    dist.destroy_process_group()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rank": rank, "maxrss_mb": round(maxrss_mb, 1)}), flush=True)


if __name__ == "__main__":
    main()
