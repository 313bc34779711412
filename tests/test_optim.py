"""The optimizer and schedule: the built-in linear decay, the learning rate each step used, and a
Task's own optimizer (parameter groups) and per-epoch schedule: recorded, checked on resume,
restored exactly."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_train import UsageError, fit
from ddp_train.config import FitConfig
from ddp_train.optim import (StepPlan, build_optimizer, build_scheduler, describe_optimizer, describe_schedule,
                              differences)
from tests.fixtures.tasks import DictTask


class OwnOptimizer(DictTask):
    """AdamW with no weight decay on biases, and a StepLR stepped per epoch (as pytorch/examples' MNIST)."""
    decay = 0.05

    def optimizer(self, model, cfg):
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
        return torch.optim.AdamW([{"params": weights, "weight_decay": self.decay},
                                  {"params": biases, "weight_decay": 0.0}], lr=cfg.lr)

    def scheduler(self, optimizer, cfg, steps):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), "epoch"


def _lrs(sched_cfg: FitConfig, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(sched_cfg, opt, StepPlan(total, total)).scheduler
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_decay_after_warmup():
    lrs = _lrs(FitConfig(scheduler="linear", warmup_steps=2, epochs=1), 10)
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # the warm-up ramp, then decay from 1
    assert lrs[2:] == pytest.approx([1 - i / 8 for i in range(8)])  # Hugging Face's linear schedule
    assert _lrs(FitConfig(scheduler="linear", epochs=1), 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_logged_lr_is_the_one_each_step_used(tmp_path):
    run_dir = tmp_path / "warm"
    fit(DictTask(), max_steps=4, warmup_steps=3, lr=0.4, log_every=1, batch_size=32, run_dir=str(run_dir),
        progress=False)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in events if e.get("event") == "train"] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def _final(run_dir) -> dict:
    """The last checkpoint's model and optimizer state (a sharded one's model only)."""
    plain = run_dir / "checkpoints" / "last.pt"
    if plain.exists():
        return torch.load(plain, weights_only=True, map_location="cpu")
    from ddp_train.checkpoint import sharded

    return {"model": sharded.export(run_dir / "checkpoints" / "last")}


@pytest.mark.parametrize("strategy", ["auto", "fsdp"])  # fsdp in one process: sharded checkpoints
def test_task_optimizer_and_epoch_schedule_resume_exactly(tmp_path, monkeypatch, capfd, strategy):
    opts = dict(batch_size=32, lr=0.02, progress=False, save_every_seconds=0, strategy=strategy)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(OwnOptimizer(), epochs=3, run_dir=str(straight), **opts)
    fit(OwnOptimizer(), epochs=2, run_dir=str(resumed), **opts)
    capfd.readouterr()
    fit(OwnOptimizer(), epochs=3, run_dir=str(resumed), **opts)
    err = capfd.readouterr().err  # it resumed: a run started over would end equal too
    assert f"resumed from {resumed}/checkpoints/last" in err and ": epoch 3, step 14 (0 of the epoch" in err, err
    a, b = _final(straight), _final(resumed)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if strategy != "fsdp":
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        assert all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]) for x, y in
                   zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    lrs = [float(r.split(",")[-2]) for r in (straight / "history.csv").read_text().splitlines()[1:]]
    header = (straight / "history.csv").read_text().splitlines()[0].split(",")
    assert header[-2] == "lr" and lrs == pytest.approx([0.02, 0.01, 0.005])  # each epoch's own rate

    described = json.loads((straight / "config.json").read_text())["optimization"]
    assert described["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    groups = described["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and groups[1]["params"] == [2, 16 + 3]
    assert described["scheduler"]["class"] == "torch.optim.lr_scheduler.StepLR"
    assert (described["scheduler"]["interval"], described["scheduler"]["gamma"]) == ("epoch", 0.5)

    monkeypatch.setattr(OwnOptimizer, "decay", 0.1)  # the user edited the code between runs
    with pytest.raises(UsageError, match=r"the optimizer or schedule differs from the checkpoint's "
                                         r"\(optimizer.param_groups\[0\].weight_decay 0.05 -> 0.1\)") as e:
        fit(OwnOptimizer(), epochs=4, run_dir=str(resumed), **opts)
    assert "\n" not in str(e.value)


def test_task_optimizer_must_hold_the_models_parameters(tmp_path):
    class Foreign(DictTask):
        def optimizer(self, model, cfg):
            return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    with pytest.raises(UsageError, match=r"Foreign.optimizer\(model, cfg\) holds tensors that are not the model's"):
        fit(Foreign(), epochs=1, run_dir=str(tmp_path / "f"), progress=False)


def test_descriptions_of_the_same_setup_compare_equal_and_name_a_change():
    def build(cfg):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        opt = build_optimizer(cfg, model)
        described = describe_optimizer(opt)  # before the schedule sets the first rates
        return {"optimizer": described, "scheduler": describe_schedule(build_scheduler(cfg, opt, StepPlan(10, 30)))}

    cfg = FitConfig(optimizer="adamw", scheduler="linear", warmup_steps=5, epochs=3)
    first = build(cfg)
    assert differences(first, build(cfg)) == []  # a resume of the same run is not refused
    assert json.loads(json.dumps(first)) == first  # config.json holds it as it is
    changed = differences(first, build(cfg.replace(warmup_steps=6)))
    assert "scheduler.schedulers[0].lr_lambdas[0].warmup 5 -> 6" in changed
