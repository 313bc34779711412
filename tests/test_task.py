"""The user's own training job: the Python API, Tasks, torchmetrics made exact, dict batches,
and augmentation that resumes bit-exactly. Real processes (torchrun, gloo) where ranks matter."""

from __future__ import annotations

import csv
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, ROOT, base_env, run_fit
from ddp_train import Task, UsageError, fit
from tests.fixtures.tasks import DictTask

EXAMPLE = ROOT / "examples" / "char_lm.py"
TASK = "tests.fixtures.tasks:DictTask"


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def _history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=base_env(), cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_readme_example_under_torchrun(tmp_path):
    """examples/char_lm.py (the README's "Your own model") as a script under torchrun, 2 ranks."""
    proc = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(EXAMPLE)], tmp_path)
    [run_dir] = (tmp_path / "runs").glob("CharLM-*")  # a directory of its own, named for the Task
    rows = _history(run_dir)
    assert len(rows) == 3 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) < 3.5
    assert proc.stdout.count("done: step") == 2  # each rank's script gets its result back
    sys.path.insert(0, str(EXAMPLE.parent))
    from char_lm import CharLM

    bare = CharLM().model(None)
    bare.load_state_dict(_ckpt(run_dir / "checkpoints" / "last.pt")["model"], strict=True)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task"] == f"{EXAMPLE}:CharLM"  # absolute: the tools find it from any folder
    assert saved["task_args"]["n_layer"] == 2 and saved["launch"]["world_size"] == 2


@pytest.mark.slow
def test_task_from_the_command_line_with_task_args(tmp_path):
    run_dir = tmp_path / "lm"
    opts = ["--task", f"{EXAMPLE}:CharLM", "--task-arg", "n_layer=1", "--task-arg", "n_embd=16",
            "--max-steps", "4", "--batch-size", "16", "--run-dir", str(run_dir), "--no-progress"]
    run_fit(1, *opts)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task_args"] == {"block": 32, "n_embd": 16, "n_layer": 1, "n_head": 4, "dropout": 0.3}
    changed = run_fit(1, *[o.replace("n_layer=1", "n_layer=2") for o in opts], check=False)
    assert changed.returncode == 2
    assert "cannot resume" in changed.stderr and "--task-arg" in changed.stderr and "'n_layer': 1" in changed.stderr
    out = subprocess.run([sys.executable, "-m", "ddp_train", "evaluate", "-c", str(run_dir / "checkpoints" / "last.pt"),
                          "--json", "--trust-code", f"{EXAMPLE}:CharLM"], capture_output=True, text=True, env=base_env(),
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["metrics"]) == {"val_loss", "val_acc"}


def test_fit_returns_a_result_and_restores_its_signal_handlers_and_the_root_logger(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    root_handlers = list(logging.getLogger().handlers)
    result = fit(DictTask(hidden=8), epochs=2, batch_size=32, run_dir=str(tmp_path / "api"), progress=False)
    assert result.status == "done" and result.exit_code == 0
    assert result.step == 14 and result.epoch == 2 and result.run_dir == str(tmp_path / "api")
    assert {"val_loss", "train_loss", "epoch", "step"} <= result.metrics.keys()
    assert result.best["step"] in (7, 14) and "val_loss" in result.best
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert logging.getLogger().handlers == root_handlers
    again = fit(DictTask(hidden=8), epochs=2, batch_size=32, run_dir=str(tmp_path / "api"), progress=False)
    assert again.status == "nothing_to_do" and again.step == 14


def test_fit_raises_the_cli_error_line(tmp_path, capfd):
    with pytest.raises(UsageError, match=r"^--monitor val_nope is not a metric of this run; choose one of "
                                         r"train_loss, val_loss$"):
        fit(DictTask(), monitor="val_nope", run_dir=str(tmp_path / "bad"))
    with pytest.raises(UsageError, match="--epochs must be >= 1"):
        fit(DictTask(), epochs=0)
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        fit(DictTask(), learning_rate=0.1)


def test_task_settings_must_be_plain_values(tmp_path):
    class Odd(Task):
        def __init__(self, thing=None):
            self.thing = thing

    with pytest.raises(UsageError, match="task settings must be plain values"):
        fit(Odd(thing=object()), run_dir=str(tmp_path / "odd"))


def test_dict_batches_train(tmp_path):
    result = fit(DictTask(metrics="acc"), epochs=3, batch_size=16, lr=0.01, run_dir=str(tmp_path / "dict"),
                 progress=False, monitor="val_acc")
    assert result.metrics["val_acc"] > 0.7, result.metrics


@pytest.mark.slow
@pytest.mark.parametrize("what", ["task", "builtin"])
def test_torchmetrics_identical_on_1_2_3_ranks(tmp_path, what):
    """evaluate of one checkpoint on 101 samples: sum-state (accuracy) and list-state (AUROC)
    torchmetrics metrics, and the built-ins, to the last bit for 1, 2 and 3 processes."""
    run_dir = tmp_path / "m"
    if what == "task":
        opts = ["--task", TASK, "--task-arg", "metrics=auroc,acc"]
    else:
        opts = ["--data", "synthetic", "--input-shape", "6", "--classes", "4", "--samples", "128",
                "--val-samples", "101", "--model", "mlp", "--hidden", "8", "--metrics", "auroc,top3"]
    run_fit(1, *opts, "--max-steps", "5", "--batch-size", "16", "--eval-batch-size", "8", "--run-dir",
            str(run_dir), "--no-progress")
    figures = {}
    for nproc in (1, 2, 3):
        launch = [sys.executable, "-m"] if nproc == 1 else [str(BIN / "torchrun"), "--standalone",
                                                              f"--nproc_per_node={nproc}", "-m"]
        trust = ["--trust-code", TASK] if what == "task" else []
        out = _run([*launch, "ddp_train", "evaluate", "-c", str(run_dir / "checkpoints" / "last.pt"), "--json", *trust],
                   ROOT)
        figures[nproc] = json.loads(out.stdout)["metrics"]
    names = {"task": {"val_loss", "val_auroc", "val_acc"},
             "builtin": {"val_loss", "val_acc", "val_f1", "val_auroc", "val_top3"}}[what]
    assert set(figures[1]) == names
    assert figures[1] == figures[2] == figures[3], figures
    print(what, figures[1])


AUG = ["--data", "synthetic", "--input-shape", "3,16,16", "--classes", "4", "--samples", "256", "--val-samples",
       "32", "--model", "cnn", "--augment", "--epochs", "2", "--log-every", "4", "--no-progress",
       "--save-every", "4", "--keep", "10", "--batch-size", "16"]
AUG_TASK = ["--task", TASK, "--task-arg", "augment=True", "--epochs", "2", "--batch-size", "16", "--log-every", "4",
            "--no-progress", "--save-every", "4", "--keep", "10"]


def _same_weights(a: Path, b: Path) -> None:
    x, y = _ckpt(a / "checkpoints" / "last.pt"), _ckpt(b / "checkpoints" / "last.pt")
    assert x["step"] == y["step"]
    for key in x["model"]:
        assert torch.equal(x["model"][key], y["model"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("opts", [AUG, AUG_TASK], ids=["in-memory", "per-sample"])
def test_augmented_resume_is_bit_exact_for_any_worker_count(tmp_path, opts):
    """Augmentation draws from (seed, epoch, index): a run resumed mid-epoch, with 0 or 2 workers,
    ends torch.equal to an uninterrupted one, and the worker count changes nothing."""
    for workers in (0, 2):
        full, resumed = tmp_path / f"full{workers}", tmp_path / f"resumed{workers}"
        run_fit(1, *opts, "--workers", str(workers), "--run-dir", str(full))
        mid = full / "checkpoints" / "step-00000012.pt"
        assert 0 < _ckpt(mid)["batch_in_epoch"]
        proc = run_fit(1, *opts, "--workers", str(workers), "--run-dir", str(resumed), "--resume", str(mid))
        assert f"resumed from {mid}: epoch 1, step 12 " in proc.stderr, proc.stderr
        _same_weights(full, resumed)
    _same_weights(tmp_path / "full0", tmp_path / "full2")
    plain = tmp_path / "plain"
    run_fit(1, *[{"--augment": "--no-augment", "augment=True": "augment=False"}.get(o, o) for o in opts],
            "--run-dir", str(plain))
    with pytest.raises(AssertionError):
        _same_weights(tmp_path / "full0", plain)  # the augmentation did change the training
