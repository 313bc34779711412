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
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import common  # benchmarks/common.py: the data, models and events every tool shares
from common import Log, build_model

WORKLOADS = {k: v for k, v in common.WORKLOADS.items() if k in ("cnn", "digits")}


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


# --- the loop ---------------------------------------------------------------------------------------

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

    train, val = common.load(args.workload, args.samples)
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
