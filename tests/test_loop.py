"""The loop's units with fakes, each test failing for one reason: the step, the loss sync, the
evaluation sync and the evaluation/stop/save policy."""

from __future__ import annotations

import math

import pytest
import torch

from ddp_train.config import FitConfig
from ddp_train.data import TensorData, eval_loader
from ddp_train.dist import Comm
from ddp_train.distenv import DistEnv
from ddp_train.errors import WriteFailure
from ddp_train.evaluation import Evaluator
from ddp_train.loop import LossWindow, Trainer
from ddp_train.policy import Policy
from ddp_train.task import Task

ONE = DistEnv.from_environ({})


class Linear(Task):
    def model(self, cfg):
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)


class FakeComm(Comm):
    """Pretends to be rank 0 of `world` ranks whose peers all hold `peer` (sum = own + peers)."""

    def __init__(self, world: int, peer: torch.Tensor | None = None):
        super().__init__(ONE)
        self.world, self.peer = world, peer

    def all_reduce_sum(self, tensor):
        tensor += self.peer if self.peer is not None else tensor * (self.world - 1)
        return tensor


def _trainer(task, cfg=FitConfig(), lr=0.1):
    model = task.model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(task, model, model, opt, None, None, cfg, torch.device("cpu")), model


def test_step_averages_micro_batches_like_one_batch():
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
    whole, m1 = _trainer(Linear())
    whole.step([(x, y)])
    accum, m2 = _trainer(Linear())
    losses, applied = accum.step([(x[:4], y[:4]), (x[4:], y[4:])])
    assert applied and [n for _, n in losses] == [4, 4]
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_step_skips_nonfinite_gradients_and_leaves_weights():
    trainer, model = _trainer(Linear(), FitConfig(skip_nonfinite=True))
    before = [p.clone() for p in model.parameters()]
    x = torch.full((4, 3), float("nan"))
    _, applied = trainer.step([(x, torch.zeros(4, dtype=torch.long))])
    assert not applied
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_step_takes_dict_batches_and_counts_samples():  # on CPU: moving to the device is not observable
    class DictLinear(Linear):
        def eval_step(self, model, batch):
            return model(batch["x"]), batch["y"]

    trainer, _ = _trainer(DictLinear())
    losses, _ = trainer.step([{"x": torch.randn(5, 3), "y": torch.zeros(5, dtype=torch.long)}])
    assert losses[0][1] == 5


def test_loss_window_is_a_sample_weighted_global_mean():
    window = LossWindow(FakeComm(2, peer=torch.tensor([3.0, 3.0, 1.0, 1.0, 0.0], dtype=torch.float64)),
                        torch.device("cpu"), skip_nonfinite=False)
    window.add([(torch.tensor(1.0), 4), (torch.tensor(2.0), 2)], step=1, epoch=1)
    total, count, bad = window.sync()  # ours: 1*4 + 2*2 = 8 over 6; the peer's: 6 over 2
    assert (total, count, bad) == (14.0, 8.0, None)


def test_loss_window_names_the_first_nonfinite_step():
    window = LossWindow(FakeComm(1), torch.device("cpu"), skip_nonfinite=False)
    for step, loss in enumerate([1.0, 2.0, float("nan"), float("inf")], start=1):
        window.add([(torch.tensor(loss), 4)], step=step, epoch=2)
    assert window.sync()[2] == (3, 2)


def test_loss_window_leaves_skipped_steps_out():
    window = LossWindow(FakeComm(1), torch.device("cpu"), skip_nonfinite=True)
    window.add([(torch.tensor(1.0), 4), (torch.tensor(float("nan")), 4)], step=1, epoch=1)
    assert window.sync() == (4.0, 4.0, None)


def test_evaluator_syncs_once_and_weights_by_samples():
    """Each chunk's loss sum enters once; the statistics travel in the same all-reduce."""
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1] * 5)

    class Counting(FakeComm):
        calls = 0

        def all_reduce_sum(self, tensor):
            Counting.calls += 1
            return tensor

    task = Linear()
    model = task.model(None)
    loader, chunks = eval_loader(TensorData(x, y), 4, 0, 1, 0, False)
    results = Evaluator(task, loader, chunks, torch.device("cpu"), Counting(1))(model)
    expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert Counting.calls == 1
    assert results["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_policy_evaluates_every_epoch_or_every_n_steps():
    every_epoch, every_3 = Policy(FitConfig()), Policy(FitConfig(eval_every=3))
    assert [every_epoch.eval_due(s, s % 4 == 0, s == 8) for s in range(1, 9)] == [False, False, False, True] * 2
    assert [every_3.eval_due(s, s % 4 == 0, s == 8) for s in range(1, 9)] == [
        False, False, True, False, False, True, False, True]


def test_policy_never_takes_nan_as_best_and_stops_after_patience():
    policy = Policy(FitConfig(monitor="val_acc", patience=2))
    assert policy.observe({"val_acc": 0.5}, 1) == (True, False)
    assert policy.observe({"val_acc": math.nan}, 2) == (False, False)
    assert policy.best == 0.5 and policy.best_step == 1
    assert policy.observe({"val_acc": 0.4}, 3) == (False, True)


def test_policy_step_files():
    assert [Policy(FitConfig(save_every=2)).step_file_due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert not Policy(FitConfig()).step_file_due(2)


def _saver(tmp_path, interval, weights):
    """A Checkpointer of one process whose checkpoint is {"step", "model": {"w": weights}}."""
    from ddp_train.checkpoint import Checkpointer

    step = [0]
    state = lambda rngs, with_tensors: {"version": 1, "step": step[0], "model": {"w": weights}}  # noqa: E731
    return Checkpointer(tmp_path, Comm(ONE), 3, state, lambda: step[0], interval=interval), step


def _on_disk(path):
    return torch.load(path, weights_only=True)


def test_checkpoints_of_evaluations_wait_for_the_interval_but_best_is_kept(tmp_path):
    w = torch.zeros(2)
    saver, step = _saver(tmp_path, interval=1e9, weights=w)
    step[0] = 1
    saver.save(best=True)  # the first is written at once
    saver.flush()
    assert _on_disk(tmp_path / "last.pt")["step"] == 1 and (tmp_path / "best.pt").exists()
    step[0], w[0] = 2, 2.0
    saver.save(best=True)  # not due: kept in memory as a snapshot, not written
    step[0], w[0] = 3, 3.0  # training goes on: the snapshot does not change
    saver.save(best=False)
    saver.flush()
    assert _on_disk(tmp_path / "last.pt")["step"] == 1 and _on_disk(tmp_path / "best.pt")["step"] == 1
    step[0] = 4
    saver.save(step_file=True)  # --save-every: always written, and the better evaluation with it
    saver.flush()
    assert _on_disk(tmp_path / "last.pt")["step"] == 4 and (tmp_path / "step-00000004.pt").exists()
    best = _on_disk(tmp_path / "best.pt")
    assert best["step"] == 2 and best["model"]["w"].tolist() == [2.0, 0.0]
    assert saver.describe_last() == f"the last good checkpoint is {tmp_path / 'last.pt'} (step 4)"


def test_a_failed_run_writes_its_better_evaluation(tmp_path):
    saver, step = _saver(tmp_path, interval=1e9, weights=torch.zeros(2))
    step[0] = 1
    saver.save()
    step[0] = 2
    saver.save(best=True)
    saver.close()  # what train.run does on any exit
    assert _on_disk(tmp_path / "best.pt")["step"] == 2 and _on_disk(tmp_path / "last.pt")["step"] == 1


def test_interval_zero_writes_every_evaluation_and_durable_waits(tmp_path):
    saver, step = _saver(tmp_path, interval=0.0, weights=torch.zeros(2))
    for s in (1, 2, 3):
        step[0] = s
        saver.save(best=s == 2, durable=s == 3)
        if s < 3:
            saver.flush()
            assert _on_disk(tmp_path / "last.pt")["step"] == s
    assert _on_disk(tmp_path / "last.pt")["step"] == 3 and _on_disk(tmp_path / "best.pt")["step"] == 2


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    saver, step = _saver(tmp_path / "gone", interval=0.0, weights=torch.zeros(2))  # the folder does not exist
    step[0] = 1
    saver.save()  # returns at once; the write fails in the background
    assert "writing the checkpoint of step 1 failed" in saver.describe_last()
    saver.save()
    with pytest.raises(WriteFailure, match="no checkpoint was written before it"):
        saver.save()
