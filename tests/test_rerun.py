"""Rerunning a command continues its run: a deterministic default run directory, `--run-dir`
alone, finished and early-stopped runs that have nothing to do, and the resume line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, base_env

pytestmark = pytest.mark.slow

OPTS = ["--data", "synthetic", "--input-shape", "8", "--classes", "3", "--samples", "128", "--val-samples", "32",
        "--hidden", "16", "--batch-size", "16", "--log-every", "2", "--no-progress"]


def fit(cwd: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m"] if nproc == 1 else [str(BIN / "torchrun"), "--standalone",
                                                        f"--nproc_per_node={nproc}", "-m"]
    return subprocess.run([*launch, "ddp_train", "fit", *args], capture_output=True, text=True, cwd=cwd,
                          env=base_env(), timeout=240)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs").iterdir())


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_identical_command_continues_its_run(tmp_path, nproc):
    cmd = [*OPTS, "--max-steps", "6", "--save-every", "3"]
    first = fit(tmp_path, *cmd, nproc=nproc)
    assert first.returncode == 0, first.stderr
    [run_dir] = run_dirs(tmp_path)
    assert run_dir.name.startswith("synthetic-mlp-")
    ckpts = run_dir / "checkpoints"
    for name in ("last.pt", "step-00000006.pt"):  # as if the job had died after step 3's checkpoint
        (ckpts / name).unlink()
    again = fit(tmp_path, *cmd, "--debug", nproc=nproc)  # --debug: how it is shown, not which run
    assert again.returncode == 0, again.stderr
    rel = run_dir.relative_to(tmp_path)
    assert f"resumed from {rel}/checkpoints/step-00000003.pt: epoch 1, step 3" in again.stderr, again.stderr
    assert run_dirs(tmp_path) == [run_dir]
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 6


def test_any_other_command_is_a_new_run(tmp_path):
    """`make fit`, then the README's next command: another run, not "nothing to do" or a refusal."""
    assert fit(tmp_path, *OPTS, "--max-steps", "3").returncode == 0
    for other in (["--max-steps", "6"], ["--max-steps", "3", "--lr", "0.01"]):
        proc = fit(tmp_path, *OPTS, *other)
        assert proc.returncode == 0 and "resumed from" not in proc.stderr, proc.stderr
    proc = fit(tmp_path, *OPTS, "--max-steps", "3", nproc=2)  # another launch shape: another run
    assert proc.returncode == 0 and "resumed from" not in proc.stderr, proc.stderr
    assert len(run_dirs(tmp_path)) == 4


def test_run_dir_alone_continues_with_the_saved_settings(tmp_path):
    run_dir = tmp_path / "x"
    assert fit(tmp_path, *OPTS, "--lr", "0.01", "--max-steps", "3", "--run-dir", str(run_dir)).returncode == 0
    proc = fit(tmp_path, "--run-dir", str(run_dir), "--max-steps", "6")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr and "epoch 1, step 3" in proc.stderr
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["lr"] == 0.01 and saved["max_steps"] == 6 and saved["samples"] == 128
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    changed = fit(tmp_path, "--run-dir", str(run_dir), "--lr", "0.1")
    assert changed.returncode == 2 and "--lr 0.01 -> 0.1" in changed.stderr


def test_finished_and_early_stopped_runs_have_nothing_to_do(tmp_path):
    done = tmp_path / "done"
    assert fit(tmp_path, *OPTS, "--epochs", "2", "--run-dir", str(done)).returncode == 0
    again = fit(tmp_path, *OPTS, "--epochs", "2", "--run-dir", str(done))
    assert again.returncode == 0 and "nothing to do" in again.stderr and "already finished" in again.stderr
    assert f"to train it longer: --run-dir {done} --epochs N" in again.stderr
    # train_loss falls, so with --mode max it "does not improve" and patience 1 stops at epoch 2
    stopped = tmp_path / "stopped"
    early = [*OPTS, "--epochs", "5", "--monitor", "train_loss", "--mode", "max", "--patience", "1",
             "--run-dir", str(stopped)]
    first = fit(tmp_path, *early)
    assert first.returncode == 0 and "early stopping" in first.stderr
    rows = (stopped / "history.csv").read_text().splitlines()
    for _ in range(2):
        proc = fit(tmp_path, *early)
        assert proc.returncode == 0 and "nothing to do" in proc.stderr and "already stopped early" in proc.stderr
    assert (stopped / "history.csv").read_text().splitlines() == rows  # no epoch appended
