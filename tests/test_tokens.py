"""Task.collate and Task.count: batches of any shape, losses exact over tokens (issue 24)."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_train.config import FitConfig
from ddp_train.data import eval_loader, train_loader
from ddp_train.evaluation import Evaluator
from ddp_train.loop import Trainer
from tests.conftest import run_fit
from tests.fixtures.tokens import SampleWeighted, TokenLM, pad_collate, sequences, true_token_mean
from tests.test_loop import FakeComm

CPU = torch.device("cpu")


def _after_one_step(task, micro_batches, comm=None):
    model = task.model(None)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    Trainer(task, model, model, opt, None, None, FitConfig(), CPU, comm=comm).step(micro_batches)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("task, exact", [(TokenLM(), True), (SampleWeighted(), False)])
def test_accumulation_gives_the_token_mean_gradient(task, exact):
    samples = sequences(8, seed=3)
    whole = _after_one_step(task, [pad_collate(samples)])
    accum = _after_one_step(task, [pad_collate(samples[i:i + 2]) for i in range(0, 8, 2)])
    diff = (whole - accum).abs().max().item()
    assert (diff < 1e-6) if exact else (diff > 1e-4), diff  # per-batch means are not the token mean


class Recording(FakeComm):
    def all_reduce_sum(self, tensor):
        self.sent = tensor.clone()
        return tensor


def _evaluate(task, model, samples, batch_size, rank=0, world=1, comm=None):
    loader, chunks = eval_loader(samples, batch_size, rank, world, 0, False, task.collate("val"), seed=0)
    return Evaluator(task, loader, chunks, CPU, comm or FakeComm(1), seed=0)(model)


@pytest.mark.parametrize("batch_size", [3, 5])
def test_val_loss_is_the_true_token_mean_at_any_batch_size_and_world_size(batch_size):
    task, samples = TokenLM(), sequences(13, seed=1)
    model = task.model(None)
    truth = true_token_mean(model, samples)
    alone = _evaluate(task, model, samples, batch_size)["val_loss"]
    peer = Recording(2)
    _evaluate(task, model, samples, batch_size, rank=1, world=2, comm=peer)
    ranks = _evaluate(task, model, samples, batch_size, rank=0, world=2, comm=FakeComm(2, peer=peer.sent))["val_loss"]
    assert alone == ranks  # chunks fixed by sample index: the same bits at any world size
    assert alone == pytest.approx(truth, rel=1e-6, abs=0)
    assert _evaluate(SampleWeighted(), model, samples, batch_size)["val_loss"] != pytest.approx(truth, rel=1e-4)


def test_collate_pads_training_batches_and_resumes_exactly():
    samples = sequences(10, seed=2)
    loader, sampler = train_loader(samples, 4, 0, 1, seed=5, workers=0, cuda=False, collate=pad_collate)
    sampler.set_epoch(1)
    batches = list(loader)
    assert [b["ids"].shape[0] for b in batches] == [4, 4, 2]
    sampler.set_epoch(1, 2)
    assert torch.equal(next(iter(loader))["labels"], batches[2]["labels"])


class Masking(TokenLM):
    """A collate with random masking, as a masked-LM collator does."""

    def collate(self, split):
        return masked_collate


def masked_collate(samples):
    batch = pad_collate(samples)
    batch["ids"] = torch.where(torch.rand(batch["ids"].shape) < 0.3, 0, batch["ids"])
    return batch


def test_evaluation_randomness_is_seeded_by_sample_index():
    task, samples = Masking(), sequences(13, seed=1)
    model = task.model(None)
    first, again = (_evaluate(task, model, samples, 4)["val_loss"] for _ in range(2))
    peer = Recording(2)
    _evaluate(task, model, samples, 4, rank=1, world=2, comm=peer)
    ranks = _evaluate(task, model, samples, 4, rank=0, world=2, comm=FakeComm(2, peer=peer.sent))["val_loss"]
    assert first == again == ranks


class OneForward(TokenLM):
    forwards = 0

    def metrics(self):
        from torchmetrics import MeanMetric
        return {"tokens": MeanMetric()}

    def eval_step(self, model, batch):
        OneForward.forwards += 1
        loss = self.loss(model, batch)
        return loss.detach().reshape(1), None, loss


def test_eval_step_returning_the_loss_gives_one_forward_per_batch():
    task, samples = OneForward(), sequences(13, seed=1)
    model = task.model(None)
    OneForward.forwards = 0
    results = _evaluate(task, model, samples, 5)
    assert OneForward.forwards == 3  # 13 samples in chunks of 5
    assert results["val_loss"] == pytest.approx(true_token_mean(model, samples), rel=1e-6)


def _weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    return torch.cat([t.flatten() for t in state.values()])


def test_one_rank_accumulation_and_two_ranks_take_the_same_token_step(tmp_path):
    """One batch of 8, 4 micro-batches of 2, and 2 ranks x 2 x 2: the same step, and val_loss the
    true token mean at evaluation batches 3, 5 and 4."""
    common = ["--task", "tests.fixtures.tokens:TokenLM", "--optimizer", "sgd", "--lr", "1", "--momentum", "0",
              "--global-batch-size", "8", "--max-steps", "1", "--no-progress"]
    runs = {"one": (1, "8", "3"), "accum": (1, "2", "5"), "ranks": (2, "2", "4")}
    for name, (nproc, batch, eval_batch) in runs.items():
        run_fit(nproc, *common, "--batch-size", batch, "--eval-batch-size", eval_batch,
                "--run-dir", str(tmp_path / name))
    one, accum, ranks = (_weights(tmp_path / name) for name in runs)
    assert (one - accum).abs().max() < 1e-6 and (one - ranks).abs().max() < 1e-6
    task = TokenLM()
    model = task.model(None)
    torch.nn.utils.vector_to_parameters(one, model.parameters())
    truth = true_token_mean(model, task.data(None)["val"])
    rows = [next(r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "eval") for name in runs]
    for row in rows:
        assert row["val_loss"] == pytest.approx(truth, rel=1e-6, abs=0)
        assert row["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-6, abs=0)  # the step's token mean


def test_mapping_batches_that_are_not_dicts_are_moved_and_counted():
    """A Hugging Face collator returns a BatchEncoding: a mapping, not a dict."""
    from collections import UserDict

    from ddp_train.batch import count, move_to

    batch = UserDict({"ids": torch.zeros(3, 5, dtype=torch.long), "labels": torch.zeros(3, 5, dtype=torch.long)})
    moved = move_to(batch, CPU)
    assert count(batch) == 3 and isinstance(moved, dict) and moved.keys() == batch.keys()


def test_a_dataloader_as_a_split_is_one_clear_error():
    from torch.utils.data import DataLoader

    from ddp_train.data import check_sizes
    from ddp_train.errors import UsageError

    samples = sequences(4, seed=0)
    with pytest.raises(UsageError, match=r"the train split is a DataLoader; return its data set .*Task.collate"):
        check_sizes({"train": DataLoader(samples, collate_fn=pad_collate), "val": samples}, 1)


def test_a_masking_training_collate_masks_the_same_tokens_after_a_resume():
    samples = sequences(10, seed=2)
    loader, sampler = train_loader(samples, 4, 0, 1, seed=5, workers=0, cuda=False, collate=masked_collate)
    sampler.set_epoch(1)
    whole = list(loader)
    torch.rand(100)  # a resumed process's generators are elsewhere
    sampler.set_epoch(1, 1)
    resumed = list(loader)
    assert len(resumed) == len(whole) - 1 == 2  # zip() of an empty list would pass anything
    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(whole[1:], resumed))
