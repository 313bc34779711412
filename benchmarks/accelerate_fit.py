"""The workloads through Hugging Face Accelerate, written as its documentation teaches (optional:
run.py skips it when `accelerate` is not importable; it is no dependency of ddp-train).

    torchrun --standalone --nproc_per_node=2 benchmarks/accelerate_fit.py --workload digits --metrics m.jsonl

Same data, model, global batch, epochs, optimizer (Adam) and learning rate as ddp-train and
raw_ddp.py. `Accelerator(cpu=True)` joins torchrun's processes (DDP over gloo when there are
several); `prepare` wraps the model, optimizer and the loaders (which it shards per rank);
`accelerator.backward(loss)`; validation accuracy every epoch through `gather_for_metrics`; the
state saved every epoch with `save_state` (ddp-train saves a checkpoint every epoch too).
linreg: one full batch per step on the tensors themselves, no validation during training and no
saved state, like raw_linreg.py.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common  # benchmarks/common.py: the data, models and events every tool shares


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    args, spec, epochs, lr = common.parse(__doc__, argv)
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    log = common.Log(args.metrics, rank)
    train, val = common.load(args.workload, args.samples)
    torch.manual_seed(args.seed)
    model = common.build_model(args.workload)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    regression = args.workload == "linreg"
    if regression:
        model, optimizer = accelerator.prepare(model, optimizer)
        batches = [tuple(t.to(accelerator.device) for t in train.tensors)]
        train_loader, val_loader = None, None
    else:
        per_rank = spec["global_batch"] // world
        model, optimizer, train_loader, val_loader = accelerator.prepare(
            model, optimizer, DataLoader(train, batch_size=per_rank, shuffle=True),
            DataLoader(val, batch_size=4 * per_rank))
    lossf = F.mse_loss if regression else F.cross_entropy

    step = samples = 0
    for epoch in range(epochs):
        model.train()
        for x, y in (batches if regression else train_loader):
            optimizer.zero_grad(set_to_none=True)
            loss = lossf(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            samples += len(y) * world
            if step == 1:
                log("first_step")
            if step % args.log_every == 0:
                log("train", step=step, epoch=epoch, samples=samples, loss=loss.item(), lr=lr)
        if regression:
            continue
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for x, y in val_loader:
                pred, y = accelerator.gather_for_metrics((model(x).argmax(1), y))
                correct += (pred == y).sum().item()
                count += len(y)
        log("eval", epoch=epoch, step=step, val_acc=correct / count)
        if args.run_dir is not None:
            accelerator.save_state(str(args.run_dir / "state"))
    log("end", step=step)
    log.close()
    accelerator.end_training()
    if rank == 0:
        print(f"accelerate {args.workload}: {step} steps", file=sys.stderr)


if __name__ == "__main__":
    main()
