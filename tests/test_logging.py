"""What a run shows and records: the progress bar and log lines, TensorBoard, a Task's own values."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ddp_train import UsageError, fit
from ddp_train.log import Progress, log, setup_logging
from tests.fixtures.tasks import DictTask


def test_log_lines_print_above_the_bar_which_counts_the_runs_steps():
    out = io.StringIO()
    setup_logging(0, False)
    bar = Progress(True, console=Console(file=out, force_terminal=True, width=120))
    bar.start_epoch(1, None, 30, 0)  # --max-steps 30 ends the run inside epoch 1 of 10
    for _ in range(12):
        bar.advance()
    log.info("epoch 1 step 12 train_loss 0.9 val_loss 0.8")
    bar.start_epoch(2, None, 30, 12)
    bar.close()
    screen = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part) for part in re.split(r"[\r\n]", out.getvalue())]
    logged = [line for line in screen if "train_loss" in line]
    assert logged == ["epoch 1 step 12 train_loss 0.9 val_loss 0.8"], screen  # a line of its own, no bar on it
    bars = [line for line in screen if "━" in line]
    assert bars and all(re.match(r"epoch [12] ━", line) for line in bars), bars  # no "/10": the steps decide
    assert any(" 12/30 " in line for line in bars) and not any("/12" in line for line in bars), bars


CRASH: dict[int, bool] = {}  # training loss call -> raise there (not a Task setting)


class Logs(DictTask):
    """Logs a value of its own every step (rank 0's); crashes where CRASH says."""

    def loss(self, model, batch):
        if model.training:  # evaluation calls loss() too
            self.calls = getattr(self, "calls", 0) + 1
        if model.training and CRASH.pop(self.calls, False):
            raise RuntimeError("a crash after the checkpoint")
        loss = super().loss(model, batch)
        self.log("twice_loss", 2 * loss)
        return loss


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_has_historys_scalars_on_the_same_steps_after_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    # 13 steps an epoch; evaluations every 4 steps; only the first one's checkpoint is written (60 s apart)
    options = dict(epochs=2, batch_size=16, eval_every=4, log_every=2, run_dir=str(run_dir), progress=False,
                   tensorboard=True)
    CRASH[11] = True
    with pytest.raises(RuntimeError, match="a crash after the checkpoint"):
        fit(Logs(), **options)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert fit(Logs(), **options).step == 26  # resumed at step 4: steps 5-10 are trained again
    with (run_dir / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    scalars = _scalars(run_dir / "tensorboard")
    assert [int(r["step"]) for r in history] == [4, 8, 12, 16, 20, 24, 26]
    for column in history[0]:
        if column == "step":
            continue
        tag = f"val/{column[4:]}" if column.startswith("val_") else column
        assert [s for s, _ in scalars[tag]] == [int(r["step"]) for r in history], (tag, scalars[tag])
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[column]) for r in history], rel=1e-6), tag
    own = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == "task"]
    assert [e["step"] for e in own] == list(range(1, 27))  # each step once: the crashed run's 5-10 were dropped
    assert [s for s, _ in scalars["task/twice_loss"]] == list(range(1, 27))
    assert [s for s, _ in scalars["train/loss"]] == list(range(2, 27, 2))
    assert scalars["task/twice_loss"][0][1] == pytest.approx(own[0]["twice_loss"], rel=1e-6)


def test_tensorboard_missing_is_one_clear_line(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else
                        find_spec(name, *a))
    with pytest.raises(UsageError, match=r"^--tensorboard needs the tensorboard package: pip install "
                                         r"'ddp-train\[tensorboard\]' \(or pip install tensorboard\), or drop "
                                         r"--tensorboard$"):
        fit(DictTask(), tensorboard=True, run_dir=str(tmp_path / "r"), progress=False)


def test_a_task_logs_numbers_or_one_element_tensors():
    task = DictTask()
    task.log("a", 1.5)
    task.log("b", torch.tensor(2.0))
    with pytest.raises(TypeError, match=r"DictTask.log\('c', ...\) takes a number or a one-element tensor, got "
                                        r"Tensor"):
        task.log("c", torch.ones(3))


class SyncedLogs(DictTask):
    synced_logs = ("twice_loss",)

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        self.log("twice_loss", 2 * loss)
        self.log("own", 1.0)
        return loss


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_synced_value_is_the_mean_over_ranks_and_steps_at_each_log_step(tmp_path, nproc):
    """On 2 ranks the train loss is the mean over both ranks' samples: a value not averaged over the
    ranks would be rank 0's alone and miss it."""
    run_dir = tmp_path / "run"
    if nproc == 1:
        fit(SyncedLogs(), max_steps=6, batch_size=16, log_every=2, run_dir=str(run_dir), progress=False)
    else:
        from conftest import run_fit
        run_fit(2, "--task", "tests.test_logging:SyncedLogs", "--max-steps", "6", "--batch-size", "16",
                "--log-every", "2", "--run-dir", str(run_dir), "--no-progress")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {e["step"]: e["loss"] for e in events if e["event"] == "train"}
    synced = {e["step"]: e["twice_loss"] for e in events if e["event"] == "task" and "twice_loss" in e}
    assert sorted(synced) == sorted(train) == [2, 4, 6]
    # train's loss is the mean since the run's start (no evaluation yet), the synced value the mean of
    # the two steps since the last log step: full batches, so step means are sample means
    window = {s: (s * train[s] - (s - 2) * train.get(s - 2, 0)) / 2 for s in train}
    assert all(synced[s] == pytest.approx(2 * window[s], rel=1e-5) for s in synced), (synced, window)
    assert [e["step"] for e in events if e["event"] == "task" and "own" in e] == [1, 2, 3, 4, 5, 6]
