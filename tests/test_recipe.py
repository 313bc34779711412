"""The image recipe's pieces: pretrained torchvision weights from the hub cache (or one clear
line), the linear warm-up, label smoothing, and the per-sample augmentation draws."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ddp_train.config import FitConfig
from ddp_train.errors import UsageError
from ddp_train.models import build_model
from ddp_train.task import BuiltinTask
from ddp_train.optim import StepPlan, build_scheduler
from ddp_train.transforms import batch_hashes, padded_crop_flip, sample_hash, seeded


def test_pretrained_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cache.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cache)  # what a download would have left there
    model = build_model("resnet18", (3, 32, 32), 7, pretrained=True)
    assert model.fc.out_features == 7  # a new last layer for 7 classes
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


@pytest.mark.slow
def test_pretrained_without_weights_or_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UsageError) as exc:
        build_model("resnet18", (3, 32, 32), 10, pretrained=True)
    message = str(exc.value)
    assert "\\n" not in message and "not in the torch hub cache" in message and "drop --pretrained" in message


def test_warmup_ramps_linearly_then_hands_over():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(FitConfig(warmup_steps=4, scheduler="cosine", epochs=1), opt, StepPlan(12, 12)).scheduler
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] < 1.0 and lrs[-1] < lrs[5]  # cosine decay after the warm-up


def test_label_smoothing_reaches_the_builtin_loss():
    task = BuiltinTask(FitConfig(label_smoothing=0.1))
    task.data(task.cfg)
    out, y = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    expected = torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1)
    assert torch.equal(task.criterion(out, y), expected) and expected > torch.nn.functional.cross_entropy(out, y)


def test_augmentation_draws_depend_on_seed_epoch_and_index_only():
    idx = torch.tensor([5, 9, 5])
    h = batch_hashes(3, 2, idx)
    assert h[0] == h[2] == sample_hash(3, 2, 5) and h[0] != h[1]
    assert not torch.equal(batch_hashes(3, 2, idx), batch_hashes(3, 3, idx))  # another epoch
    x = torch.randn(3, 3, 8, 8)
    out = padded_crop_flip(x, h)
    assert out.shape == x.shape and torch.equal(out[1], padded_crop_flip(x[1:2], h[1:2])[0])  # batch = one by one
    with seeded(sample_hash(0, 1, 7)):
        a = torch.rand(3)
    before = torch.get_rng_state()
    with seeded(sample_hash(0, 1, 7)):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(before, torch.get_rng_state())  # the caller's stream untouched
