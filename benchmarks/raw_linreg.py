"""The baseline for `linreg`: the classic hand-written full-batch linear regression loop.

    python benchmarks/raw_linreg.py --metrics m.jsonl [--samples 1000000 --epochs 50 --lr 0.1]

The same tensors as `ddp-train fit --data linreg` (ddp_train's generator), the same model
(Flatten + Linear(2, 1), seeded as ddp-train seeds it), MSE, Adam: one step per epoch over all
samples. Rank 0's events: `first_step`, a `train` event after every step (its time marks the
step), `eval` (validation MSE, once, at the end) and `end`.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import common  # benchmarks/common.py: the data, models and events every tool shares


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_args(p, workload="linreg")
    args = p.parse_args(argv)
    spec = common.WORKLOADS["linreg"]
    epochs, lr = args.epochs or spec["epochs"], args.lr or spec["lr"]
    log = common.Log(args.metrics, 0)
    train, val = common.load("linreg", args.samples)
    x, y = train.tensors
    torch.manual_seed(args.seed)
    model = common.build_model("linreg")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, epochs + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if step == 1:
            log("first_step")
        log("train", step=step, epoch=step - 1, samples=step * len(x), loss=loss.item(), lr=lr)
    with torch.no_grad():
        mse = F.mse_loss(model(val.tensors[0]), val.tensors[1]).item()
    w, b = model[1].weight.view(-1).tolist(), model[1].bias.item()
    log("eval", epoch=epochs - 1, step=epochs, val_mse=mse)
    log("end", step=epochs)
    log.close()
    print(f"step {epochs} loss {loss.item():.4f} val_mse {mse:.4f} w {w} b {b:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
