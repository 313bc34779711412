"""Per-step cost of the stop vote's variants, measured inside one pair of processes.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/vote_cost.py [--blocks 20]

The digits workload's step (MLP 64-128-64-10, 32 samples per rank, fused Adam, DDP over gloo) runs
in blocks of --block steps, one variant per block, the variants in rotating order, so that a
shared machine's drift hits all of them alike; rank 0 prints each variant's median ms per step:

- none:      no vote at all (the floor; not a valid design: SIGTERM would wait for the epoch's end)
- every:     one async all-reduce on the control group every step (StopVote with every_s=0)
- ddp_train: ddp_train's vote, every ~0.2 s of steps (at most 64), agreed by the ranks
- hook:      the previous design: the flag rides in DDP's gradient all-reduce, through a Python
             comm hook that replaces DDP's C++ all-reduce (kept here, and only here, to compare)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddp_train.stopvote import StopVote  # noqa: E402


class HookVote:
    """The previous design: the flag rides at the end of DDP's first gradient bucket."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel):
        self.group, self.flag, self.carried = ddp.process_group, False, []
        ddp.register_comm_hook(state=None, hook=self.hook)

    def vote(self, flag: bool) -> bool:
        self.flag |= flag
        decision = any(bool(t.item() > 0) for t in self.carried)
        self.carried.clear()
        return decision

    def end(self) -> None:
        pass

    def hook(self, state, bucket):
        grads = bucket.buffer()
        grads.div_(self.group.size())
        if bucket.index() != 0:
            return dist.all_reduce(grads, group=self.group, async_op=True).get_future().then(lambda f: f.value()[0])
        packed = torch.cat([grads, torch.full((1,), float(self.flag), dtype=grads.dtype)])
        self.flag = False

        def unpack(fut):
            reduced = fut.value()[0]
            grads.copy_(reduced[:-1])
            self.carried.append(reduced[-1:].clone())
            return grads

        return dist.all_reduce(packed, group=self.group, async_op=True).get_future().then(unpack)


class NoVote:
    def vote(self, flag: bool) -> bool:
        return False

    def end(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block", type=int, default=50, help="steps per block")
    p.add_argument("--blocks", type=int, default=20, help="blocks per variant (after one warm-up round)")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    plain, hooked = nn.parallel.DistributedDataParallel(model()), nn.parallel.DistributedDataParallel(model())
    hook_votes = HookVote(hooked)
    opt_plain = torch.optim.Adam(plain.parameters(), fused=True)
    opt_hooked = torch.optim.Adam(hooked.parameters(), fused=True)
    variants = {"none": (plain, opt_plain, NoVote()), "every": (plain, opt_plain, StopVote(control, every_s=0)),
                "ddp_train": (plain, opt_plain, StopVote(control)), "hook": (hooked, opt_hooked, hook_votes)}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 64, generator=g), torch.randint(10, (32,), generator=g)
    names = list(variants)
    ms: dict[str, list[float]] = {k: [] for k in names}
    for b in range(args.blocks + 1):
        for k in names[b % len(names):] + names[:b % len(names)]:
            net, opt, votes = variants[k]
            t0 = time.perf_counter()
            for _ in range(args.block):
                F.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if votes.vote(False):
                    raise SystemExit("a vote nobody asked for")
            votes.end()
            if b:  # round 0 warms up
                ms[k].append((time.perf_counter() - t0) / args.block * 1e3)
    if rank == 0:
        floor = statistics.median(ms["none"])
        print(f"load average {os.getloadavg()[0]:.2f}; median of {args.blocks} blocks of {args.block} steps")
        for k in names:
            m = statistics.median(ms[k])
            print(f"{k:9} {m:6.3f} ms/step  {m - floor:+.3f} ms vs none  throughput x{floor / m:.2f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
