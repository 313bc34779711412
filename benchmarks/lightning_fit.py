"""The workloads through PyTorch Lightning, written as its documentation teaches (optional: run.py
skips it when `lightning` is not importable; it is no dependency of ddp-train).

    torchrun --standalone --nproc_per_node=2 benchmarks/lightning_fit.py --workload digits --metrics m.jsonl

Same data, model, global batch, epochs, optimizer (Adam) and learning rate as ddp-train and
raw_ddp.py. A LightningModule with training/validation steps, a `Trainer(accelerator="cpu",
devices=WORLD_SIZE, strategy="ddp")` under torchrun (Lightning joins torchrun's processes, it
spawns none), its defaults otherwise: the DistributedSampler it inserts, a checkpoint every epoch
(ddp-train saves one too), validation every epoch with `sync_dist=True` metrics; no progress bar,
logger or model summary (output only). linreg: one full batch per step (`common.FullBatch`), no
validation during training, like raw_linreg.py. A callback writes the same metrics.jsonl events.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common  # benchmarks/common.py: the data, models and events every tool shares


def main(argv: list[str] | None = None) -> None:
    import lightning as L

    args, spec, epochs, lr = common.parse(__doc__, argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    regression = args.workload == "linreg"
    lossf = F.mse_loss if regression else F.cross_entropy
    log = common.Log(args.metrics, rank)
    train, val = common.load(args.workload, args.samples)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = common.build_model(args.workload)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return lossf(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    class Events(L.Callback):
        samples = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = trainer.global_step
            self.samples += len(batch[1]) * world
            if step == 1:
                log("first_step")
            if step % args.log_every == 0:
                log("train", step=step, epoch=trainer.current_epoch, samples=self.samples,
                    loss=outputs["loss"].item(), lr=lr)

        def on_validation_epoch_end(self, trainer, module):
            if not trainer.sanity_checking:
                log("eval", epoch=trainer.current_epoch, step=trainer.global_step,
                    val_acc=trainer.callback_metrics["val_acc"].item())

    torch.manual_seed(args.seed)
    module = Module()
    if regression:
        train_loader, val_loader = DataLoader(common.FullBatch(train), batch_size=None), None
    else:
        per_rank = spec["global_batch"] // world
        train_loader = DataLoader(train, batch_size=per_rank, shuffle=True)
        val_loader = DataLoader(val, batch_size=4 * per_rank)
    trainer = L.Trainer(accelerator="cpu", devices=world, num_nodes=1, strategy="ddp" if world > 1 else "auto",
                        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Events()],
                        # Lightning's checkpoints go to the run dir, else to a temporary folder (never the checkout)
                        default_root_dir=args.run_dir or tempfile.mkdtemp(prefix="lightning-"))
    trainer.fit(module, train_loader, val_loader)
    log("end", step=trainer.global_step)
    log.close()
    if rank == 0:
        print(f"lightning {args.workload}: {trainer.global_step} steps", file=sys.stderr)


if __name__ == "__main__":
    main()
