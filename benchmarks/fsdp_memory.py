"""Per-rank training state and step time, DDP vs FSDP2 (ddp_train.fsdp), on CPU over gloo.

    python benchmarks/fsdp_memory.py            # launches itself under torchrun, 2 ranks
    python benchmarks/fsdp_memory.py --nproc 4 --width 1024 --steps 30

Memory is counted, not sampled: the bytes each rank holds for parameters, gradients and optimizer
state (Adam) after one step, local shards only (numel * element_size of the DTensor's local part).
Not counted: DDP's gradient buckets (another full copy of the gradients unless
gradient_as_bucket_view=True) and FSDP's transient unsharded parameters and gradients of the block
that is running (freed after it), activations. Step time is the median over --steps steps after
--warmup, the two strategies alternating in rounds of 5 steps so that load from other processes on
a shared machine hits both alike. Rank 0 prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddp_train import fsdp  # noqa: E402

MiB = 2 ** 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks, when launching itself (default 2)")
    p.add_argument("--width", type=int, default=1024, help="hidden width (default 1024: 4.5M parameters)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per strategy (default 20)")
    return p.parse_args(argv)


def make_model(width: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(256, width)]
    for _ in range(blocks):
        layers.append(nn.Sequential(nn.Linear(width, width), nn.ReLU()))
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class Trainer:
    def __init__(self, name: str, model: nn.Module, local_batch: int):
        self.name, self.model = name, model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(dist.get_rank())
        self.x = torch.randn(local_batch, 256, generator=g)
        self.y = torch.randint(0, 10, (local_batch,), generator=g)
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        dist.barrier()
        start = time.perf_counter()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        fsdp.clip_grad_norm(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)  # keep the gradients allocated: they count
        if timed:
            self.times.append(time.perf_counter() - start)


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_batch = args.batch // world
    ddp = Trainer("DDP", nn.parallel.DistributedDataParallel(make_model(args.width, args.blocks)), local_batch)
    sharded = Trainer("FSDP", fsdp.shard(make_model(args.width, args.blocks), precision="32", device="cpu"),
                      local_batch)
    trainers = [ddp, sharded]
    for t in trainers:
        for _ in range(args.warmup):
            t.step(timed=False)
    memory = {t.name: fsdp.local_bytes(t.model, t.opt) for t in trainers}
    for _ in range(0, args.steps, 5):
        for t in trainers:
            for _ in range(5):
                t.step(timed=True)
    report = {"memory": memory, "median_s": {t.name: statistics.median(t.times) for t in trainers}}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        n_params = sum(p.numel() for p in make_model(args.width, args.blocks).parameters())
        print(table(reports, n_params, args, world))
    dist.destroy_process_group()


def table(reports: list[dict], n_params: int, args: argparse.Namespace, world: int) -> str:
    """Memory: the largest rank's figure; time: rank 0's median step."""
    def mem(name: str, kind: str) -> float:
        return max(r["memory"][name][kind] for r in reports) / MiB

    rows = {}
    for name in ("DDP", "FSDP"):
        parts = [mem(name, k) for k in ("params", "grads", "optim")]
        rows[name] = [*parts, max(sum(r["memory"][name].values()) for r in reports) / MiB,
                      reports[0]["median_s"][name] * 1000]
    ratio = [f / d for f, d in zip(rows["FSDP"], rows["DDP"])]
    lines = [f"{n_params / 1e6:.2f}M parameters (float32, Adam), {world} ranks, gloo on CPU, global batch "
             f"{args.batch}, torch {torch.__version__}; per rank (largest rank), median of {args.steps} steps",
             "",
             "| strategy | params MiB | grads MiB | Adam state MiB | total MiB | step ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values[:4]) + f" | {values[4]:.1f} |")
    lines.append("| FSDP/DDP | " + " | ".join(f"{v:.2f}" for v in ratio) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={args.nproc}", __file__, *(argv or sys.argv[1:])]
    raise SystemExit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
