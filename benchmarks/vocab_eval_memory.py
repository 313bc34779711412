"""Peak memory of evaluating a GPT-2-vocabulary (50,257) model: a tiny embedding + output layer
whose logits are most of the memory, as in a real language model's evaluation (issue 24).

    /usr/bin/time -v ddp-train fit --task benchmarks/vocab_eval_memory.py:VocabLM --batch-size 8 \\
        --max-steps 1 --no-progress --run-dir /tmp/vocab-mem [--eval-batch-size 32]

compares the evaluation batch default (the training batch) with the former one (4 x the batch).
"""

from __future__ import annotations

import torch
from torch import nn

from ddp_train import Task
from ddp_train.data import TensorData

VOCAB = 50257


class VocabLM(Task):
    def __init__(self, samples: int = 64, length: int = 128):
        self.samples, self.length = samples, length

    def data(self, cfg):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(VOCAB, (self.samples, self.length + 1), generator=g)
        split = TensorData(ids[:, :-1], ids[:, 1:])
        return {"train": split, "val": split}

    def model(self, cfg):
        return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))

    def eval_step(self, model, batch):
        ids, labels = batch
        return model(ids).flatten(0, 1), labels.flatten()
