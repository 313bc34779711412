"""Our sufficient-statistics metrics equal torchmetrics' on the same predictions."""

import pytest
import torch
import torchmetrics

from ddp_train.metrics import Statistics


def _ours(task, k, outs, ys, chunks=3):
    stats = Statistics(task, k, chunks, torch.device("cpu"))
    for c, (o, y) in enumerate(zip(outs.chunk(chunks), ys.chunk(chunks))):
        stats.update(c, o, y)
    return stats.compute(len(ys))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    k = 7
    logits, y = torch.randn(301, k, generator=g), torch.randint(0, k - 1, (301,), generator=g)  # class 6 absent
    ours = _ours("classification", k, logits, y)
    acc = torchmetrics.Accuracy(task="multiclass", num_classes=k)(logits, y).item()
    f1 = torchmetrics.F1Score(task="multiclass", num_classes=k, average="macro")(logits, y).item()
    assert ours["val_acc"] == pytest.approx(acc, abs=1e-7)
    assert ours["val_f1"] == pytest.approx(f1, abs=1e-6)
    assert ours["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_regression_matches_torchmetrics(k):
    g = torch.Generator().manual_seed(k)
    y = torch.randn(257, k, generator=g) * 3 + 1
    pred = y + torch.randn(257, k, generator=g)
    ours = _ours("regression", k, pred, y)
    p, t = (pred.squeeze(-1), y.squeeze(-1)) if k == 1 else (pred, y)
    assert ours["val_mse"] == pytest.approx(torchmetrics.MeanSquaredError()(p, t).item(), rel=1e-6)
    assert ours["val_mae"] == pytest.approx(torchmetrics.MeanAbsoluteError()(p, t).item(), rel=1e-6)
    assert ours["val_r2"] == pytest.approx(torchmetrics.R2Score()(p, t).item(), rel=1e-5)
