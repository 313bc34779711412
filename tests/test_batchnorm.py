"""BatchNorm under DDP and FSDP at 2 ranks: evaluation and checkpoints see one model's running
statistics (rank 0's), and FSDP evaluation pads with a real batch (the model rejects empty ones).
FSDP in bf16 with BatchNorm kept in float32: here the choice of layers; a timm ResNet trains so in
tests/test_example_timm.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_env, run_fit

pytestmark = pytest.mark.slow

TASK = "tests.fixtures.tasks:BatchNormTask"
# 101 validation samples in chunks of 40: 3 chunks, so under FSDP rank 1 pads one forward.
OPTS = ["--task", TASK, "--epochs", "2", "--batch-size", "16", "--eval-batch-size", "40", "--no-progress",
        "--save-every-seconds", "0"]


def _evals(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "eval"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_in_run_validation_is_the_checkpoints(tmp_path, strategy):
    run_dir = tmp_path / strategy
    run_fit(2, *OPTS, "--strategy", strategy, "--run-dir", str(run_dir))
    in_run = _evals(run_dir)[-1]["val_loss"]
    ckpt = run_dir / "checkpoints" / ("last" if strategy == "fsdp" else "last.pt")
    out = subprocess.run([sys.executable, "-m", "ddp_train", "evaluate", "-c", str(ckpt), "--json",
                          "--trust-code", "tests.fixtures.tasks:BatchNormTask"],
                         capture_output=True, text=True, env=base_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    saved = json.loads(out.stdout)["metrics"]["val_loss"]
    print(f"{strategy}, 2 ranks: in-run val_loss {in_run!r}, the checkpoint evaluates to {saved!r}")
    assert saved == pytest.approx(in_run, rel=1e-6, abs=0)


def test_norms_with_running_statistics_are_their_own_float32_units():
    from ddp_train.fsdp import running_stat_norms
    from tests.fixtures.tasks import SmallResNet

    model = SmallResNet()
    norms = running_stat_norms(model)
    assert norms == [model.stem[1], model.layer1[1], model.layer1[4]]
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.BatchNorm1d(2, affine=False))
    assert running_stat_norms(plain) == []  # no running statistics, or no parameters to cast


@pytest.mark.parametrize("n_val", [3, 101])  # rank 1 of 2: no chunk at all (3 samples), or one fewer (101)
def test_lockstep_padding_runs_real_batches(n_val):
    """Under FSDP a rank with fewer evaluation chunks runs the missing forwards on a real batch,
    not an empty one, and the results are left out."""
    from ddp_train.data import eval_loader
    from ddp_train.evaluation import Evaluator
    from test_loop import FakeComm
    from tests.fixtures.tasks import BatchNormTask, Images

    task = BatchNormTask()
    model = task.model(None).eval()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    loader, chunks = eval_loader(Images(n_val, 1), 40, 1, 2, 0, False)
    evaluator = Evaluator(task, loader, chunks, torch.device("cpu"), FakeComm(1), lockstep=True)
    results = evaluator(model)
    forwards = -(-chunks.num_chunks // 2)  # as many as rank 0 runs
    assert len(sizes) == forwards and 0 not in sizes
    # padding is not counted: with no chunk of its own, this rank has no loss units (nan locally)
    assert math.isnan(results["val_loss"]) if n_val == 3 else results["val_loss"] >= 0
    if n_val == 101:  # its one chunk's figures alone: the padding forward adds nothing
        loader, chunks = eval_loader(Images(n_val, 1), 40, 1, 2, 0, False)
        assert Evaluator(task, loader, chunks, torch.device("cpu"), FakeComm(1))(model) == results
