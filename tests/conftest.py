"""Helpers for tests that launch real processes: `python -m ddp_train` and `torchrun`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # The venv's bin first: scripts that take a command as a word list ("python -m ...") find this
    # interpreter by name, so a checkout whose path has spaces works too.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true",
               PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]))
    env.update(extra)
    return env


def fit_cmd(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ddp_train", "fit", *args]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "ddp_train", "fit", *args]


def run_fit(nproc: int, *args: str, timeout: float = 240, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(fit_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout,
                          env=env or base_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny(tmp_path):
    """Options for a fast synthetic run in a fresh run directory."""
    def make(name: str = "run", *extra: str) -> list[str]:
        return ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "256",
                "--val-samples", "101", "--model", "mlp", "--hidden", "32", "--batch-size", "16",
                "--run-dir", str(tmp_path / name), "--log-every", "5", "--no-progress", *extra]
    return make
