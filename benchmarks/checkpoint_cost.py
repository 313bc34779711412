"""What one checkpoint of a small model costs: the snapshot the training thread takes (state dicts
copied to host memory) and the write the background thread does (torch.save, fsync, rename,
fsync of the folder), for the digits MLP and the MNIST CNN with Adam state, into a temporary
folder on the disk this runs from.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_cost.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common  # noqa: F401  (puts the checkout's ddp_train on sys.path)
from ddp_train.checkpoint import plain, state as ckpt_state
from ddp_train.models import cnn, mlp


def state_of(model: torch.nn.Module) -> dict:
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"version": 1, "step": 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": [ckpt_state.rng_state()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ckpt-cost-", dir=Path(__file__).resolve().parent))
    try:
        for name, model in (("digits MLP", mlp((64,), 10)), ("MNIST CNN", cnn((1, 28, 28), 10))):
            state = state_of(model)
            snap, write = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                s = ckpt_state.snapshot(state)
                t1 = time.perf_counter()
                plain.write(s, folder, best=True, step_file=False, keep=1)
                t2 = time.perf_counter()
                snap.append(t1 - t0)
                write.append(t2 - t1)
            params = sum(t.numel() for t in model.parameters())
            size = (folder / "last.pt").stat().st_size
            print(f"{name}: {params:,} parameters, {size / 1024:.0f} KiB file; snapshot (training thread) "
                  f"{statistics.median(snap) * 1e3:.2f} ms, write (background) {statistics.median(write) * 1e3:.2f} ms "
                  f"(medians of {args.repeats})")
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
