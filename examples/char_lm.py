"""A tiny character-level language model, trained with ddp_train's Python API.

    python examples/char_lm.py                                   # one process
    torchrun --standalone --nproc_per_node=2 examples/char_lm.py # DDP, two processes
    ddp-train fit --task examples/char_lm.py:CharLM --task-arg n_layer=1 --epochs 2

Each command gets a run directory of its own (runs/CharLM-<hash>); RUN_DIR names one instead
(the Slurm scripts set it).

The model's forward takes (idx, targets) and returns (logits, loss), as GPT-style code does; the
Task says how to get the loss and what to measure. Everything distributed is ddp_train's.
"""

import os

import torch
import torchmetrics
from torch import nn
from torch.utils.data import Dataset

from ddp_train import Task, fit

TEXT = """\
A process that trains a model on many machines must agree with its peers about everything that
matters: which samples each one reads, when to stop, when to write a checkpoint, and what to do
when one of them fails. When they agree, the job can be stopped at any step and resumed on the
next, and the numbers it reports are the numbers a single process would have reported. When they
do not agree, a job hangs in a collective that one rank never reaches, or it reports an accuracy
that depends on how many processes happened to run it. The cure is dull and reliable: every
decision is made from values that every rank holds, every random draw that shapes training is a
function of the seed, the epoch and the sample, and every file is written once, completely, and
renamed into place. A checkpoint that is half written is not a checkpoint. An error that prints a
traceback from every rank is not an error message. A metric that is a mean of means is not the
metric. Small tools that keep these promises are easier to trust than large tools that do not.
"""


class Chars(Dataset):
    """Every window of `block` characters, with the next character of each as the target."""

    def __init__(self, ids: torch.Tensor, block: int):
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return len(self.ids) - self.block

    def __getitem__(self, i: int):
        chunk = self.ids[i:i + self.block + 1]
        return chunk[:-1], chunk[1:]


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_embd: int, n_layer: int, n_head: int, dropout: float):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout, batch_first=True, norm_first=True)
            for _ in range(n_layer))
        self.head = nn.Linear(n_embd, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        logits = self.head(x)
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class CharLM(Task):
    def __init__(self, block: int = 32, n_embd: int = 48, n_layer: int = 2, n_head: int = 4, dropout: float = 0.3):
        self.block, self.n_embd, self.n_layer, self.n_head, self.dropout = block, n_embd, n_layer, n_head, dropout
        self.chars = sorted(set(TEXT))

    def data(self, cfg):
        ids = torch.tensor([self.chars.index(c) for c in TEXT])
        cut = int(0.8 * len(ids))
        return {"train": Chars(ids[:cut], self.block), "val": Chars(ids[cut:], self.block)}

    def model(self, cfg):
        return TinyGPT(len(self.chars), self.block, self.n_embd, self.n_layer, self.n_head, self.dropout)

    def loss(self, model, batch):
        idx, targets = batch
        _, loss = model(idx, targets)
        return loss

    def eval_step(self, model, batch):
        idx, targets = batch
        logits, _ = model(idx)
        return logits.flatten(0, 1), targets.flatten()

    def metrics(self):
        return {"acc": torchmetrics.classification.MulticlassAccuracy(len(self.chars), average="micro")}

    def blocks(self, model):
        return list(model.blocks)  # what --strategy fsdp shards one by one


if __name__ == "__main__":
    # Ctrl-C (or a scheduler's SIGTERM) saves a checkpoint, then fit raises ddp_train.Interrupted
    # (Preempted): SystemExits that end this script with code 130 (3), as `ddp-train fit` does.
    # Running the script again continues the run.
    result = fit(CharLM(), epochs=3, batch_size=32, lr=3e-3, monitor="val_acc", run_dir=os.environ.get("RUN_DIR"))
    print(f"{result.status}: step {result.step}, val_loss {result.metrics.get('val_loss', float('nan')):.3f}, "
          f"val_acc {result.metrics.get('val_acc', float('nan')):.3f}; best {result.best}; {result.run_dir}")
