"""An image classifier built from timm's parts, trained with ddp_train: timm's resnet18, its
RandAugment + random erasing training transform, label smoothing, and its AdamW with no weight
decay on biases and norm weights (two parameter groups), with a cosine schedule stepped per epoch.

    pip install timm
    python examples/timm_classifier.py                                   # one process
    torchrun --standalone --nproc_per_node=2 examples/timm_classifier.py # DDP, two processes
    ddp-train fit --task examples/timm_classifier.py:TimmClassifier --task-arg width=16 --epochs 3
    torchrun --standalone --nproc_per_node=2 -m ddp_train fit --task examples/timm_classifier.py:TimmClassifier \\
        --strategy fsdp --precision bf16 --epochs 3                      # FSDP, BatchNorm kept in float32

The images are drawn here (a bright square in one of four quadrants, on noise): nothing is
downloaded. The augmentation is random per sample; ddp_train seeds each sample's draws (Python's,
NumPy's and torch's generators) by (seed, epoch, index), so a resumed run sees the same images.
"""

import os

import torch
import torchmetrics
from PIL import Image
from torch.utils.data import Dataset

from ddp_train import Task, fit


class Quadrants(Dataset):
    """`n` RGB images of size x size: class c has a bright square in quadrant c, on noise. With a
    timm `transform`, each sample is the transformed PIL image and its label."""

    def __init__(self, n: int, size: int, seed: int, transform):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        images = torch.randint(0, 96, (n, size, size, 3), generator=g, dtype=torch.uint8)
        half = size // 2
        for i, c in enumerate(self.labels.tolist()):
            top, left = (c // 2) * half, (c % 2) * half
            images[i, top + 2:top + half - 2, left + 2:left + half - 2] = 224
        self.images, self.transform = images.numpy(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class TimmClassifier(Task):
    def __init__(self, width: int = 64, size: int = 32, samples: int = 512, smoothing: float = 0.1,
                 weight_decay: float = 0.05):
        self.width, self.size, self.samples = width, size, samples
        self.smoothing, self.weight_decay = smoothing, weight_decay

    def data(self, cfg):
        from timm.data import create_transform

        # timm's ImageNet RandAugment, magnitudes capped at 9: at 10, posterize keeps 0 bits, which
        # Pillow >= 11 refuses.
        train = create_transform(self.size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1-mmax9",
                                 re_prob=0.25, re_mode="pixel", interpolation="bicubic")
        val = create_transform(self.size, is_training=False, crop_pct=1.0, interpolation="bicubic")
        return {"train": Quadrants(self.samples, self.size, 0, train),
                "val": Quadrants(self.samples // 4, self.size, 1, val)}

    def model(self, cfg):
        import timm

        w = self.width  # 64: timm's resnet18 itself; smaller for a quick run
        return timm.create_model("resnet18", num_classes=4, channels=(w, 2 * w, 4 * w, 8 * w), stem_width=w)

    def loss(self, model, batch):
        from timm.loss import LabelSmoothingCrossEntropy

        x, y = batch
        if not model.training:  # the validation loss is the plain cross-entropy
            return torch.nn.functional.cross_entropy(model(x).float(), y)
        return LabelSmoothingCrossEntropy(self.smoothing)(model(x).float(), y)

    def metrics(self):
        return {"acc": torchmetrics.classification.MulticlassAccuracy(4, average="micro")}

    def optimizer(self, model, cfg):
        from timm.optim import create_optimizer_v2

        # timm's own split: biases and norm weights in a group without weight decay.
        return create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=self.weight_decay)

    def scheduler(self, optimizer, cfg, steps):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), "epoch"


if __name__ == "__main__":
    result = fit(TimmClassifier(width=16), epochs=4, batch_size=32, lr=2e-3,
                 run_dir=os.environ.get("RUN_DIR"))
    print(f"done: step {result.step}, val_acc {result.metrics.get('val_acc', float('nan')):.3f}")
