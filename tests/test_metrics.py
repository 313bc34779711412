"""Our sufficient-statistics metrics equal torchmetrics' on the same predictions, and torchmetrics
metrics merged chunk by chunk equal the metric computed over all the data at once."""

import pytest
import torch
import torchmetrics

from ddp_train.errors import UsageError
from ddp_train.metrics import ChunkedMetric, ClassificationStats, RegressionStats, named_metrics


def _ours(cls, k, outs, ys, chunks=3):
    stats = cls(k, chunks, torch.device("cpu"))
    for c, (o, y) in enumerate(zip(outs.chunk(chunks), ys.chunk(chunks))):
        stats.update(c, o, y)
    return stats.compute()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    k = 7
    logits, y = torch.randn(301, k, generator=g), torch.randint(0, k - 1, (301,), generator=g)  # class 6 absent
    ours = _ours(ClassificationStats, k, logits, y)
    acc = torchmetrics.Accuracy(task="multiclass", num_classes=k)(logits, y).item()
    f1 = torchmetrics.F1Score(task="multiclass", num_classes=k, average="macro")(logits, y).item()
    assert ours["acc"] == pytest.approx(acc, abs=1e-7)
    assert ours["f1"] == pytest.approx(f1, abs=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_regression_matches_torchmetrics(k):
    g = torch.Generator().manual_seed(k)
    y = torch.randn(257, k, generator=g) * 3 + 1
    pred = y + torch.randn(257, k, generator=g)
    ours = _ours(RegressionStats, k, pred, y)
    p, t = (pred.squeeze(-1), y.squeeze(-1)) if k == 1 else (pred, y)
    assert ours["mse"] == pytest.approx(torchmetrics.MeanSquaredError()(p, t).item(), rel=1e-6)
    assert ours["mae"] == pytest.approx(torchmetrics.MeanAbsoluteError()(p, t).item(), rel=1e-6)
    assert ours["r2"] == pytest.approx(torchmetrics.R2Score()(p, t).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["auroc", "ap", "top3", "precision", "recall"])
def test_chunked_torchmetrics_equal_one_pass(name):
    """List states (AUROC's predictions) and sum states (accuracy), merged in chunk order."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(101, 5, generator=g), torch.randint(0, 5, (101,), generator=g)
    metric = named_metrics(name, "classification", 5)[name]
    whole = metric(logits, y).item()
    chunked = ChunkedMetric(name, named_metrics(name, "classification", 5)[name])
    states = [chunked.chunk_state(o, t) for o, t in zip(logits.split(16), y.split(16))]
    assert chunked.compute(states) == pytest.approx(whole, abs=1e-6)


def test_unknown_metric_names_list_the_known_ones():
    with pytest.raises(UsageError, match="choose from auroc, ap, top3"):
        named_metrics("auroc,top9", "classification", 10)
    with pytest.raises(UsageError, match="needs more than 3 classes"):
        named_metrics("top5", "classification", 3)


def test_a_metric_with_a_custom_reduction_is_refused():
    with pytest.raises(UsageError, match="cannot be merged exactly"):
        ChunkedMetric("pearson", torchmetrics.PearsonCorrCoef())
