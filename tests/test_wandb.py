"""wandb in offline mode (WANDB_MODE=offline from base_env) writing real run files: one run from rank 0
only, its id kept in the checkpoint, and the same id continued on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_fit
from ddp_train import cli


def tiny_opts(run_dir: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "256",
            "--val-samples", "101", "--model", "mlp", "--hidden", "32", "--batch-size", "16",
            "--run-dir", str(run_dir), "--log-every", "1", "--no-progress", *extra]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def ckpt_run_id(run_dir: Path) -> str | None:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["wandb_run_id"]


@pytest.mark.slow
def test_two_ranks_write_one_offline_run_and_resume_continues_it(tmp_path):
    run_dir = tmp_path / "run"
    run_fit(2, *tiny_opts(run_dir, "--wandb", "--max-steps", "2"))

    runs = offline_runs(run_dir)
    assert len(runs) == 1, runs  # rank 0 alone logs
    run_id = ckpt_run_id(run_dir)
    assert run_id and runs[0].name.endswith(f"-{run_id}"), (runs[0].name, run_id)
    data = runs[0] / f"run-{run_id}.wandb"
    records = data.read_bytes()  # protobuf records: the logged keys are there as plain strings
    assert b"train/loss" in records and b"val/acc" in records

    proc = run_fit(2, *tiny_opts(run_dir, "--wandb", "--max-steps", "4"))
    assert "resumed from" in proc.stderr
    assert ckpt_run_id(run_dir) == run_id
    # offline wandb starts a new folder per process (its name has the start time), with the same id
    runs = offline_runs(run_dir)
    assert 1 <= len(runs) <= 2, runs
    assert all(r.name.endswith(f"-{run_id}") for r in runs), [r.name for r in runs]
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)


def test_without_wandb_no_wandb_files(tmp_path, capfd):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", *tiny_opts(run_dir, "--max-steps", "1")])
    assert exc.value.code == 0, capfd.readouterr().err
    assert not (run_dir / "wandb").exists()
    assert not list(tmp_path.rglob("*wandb*"))
    assert ckpt_run_id(run_dir) is None


def test_no_api_key_and_no_network_logs_offline_with_one_warning(tmp_path):
    """The tracker never stops training: no key (and no network here) means offline, said once."""
    import os

    from conftest import base_env

    env = {k: v for k, v in base_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    run_dir = tmp_path / "run"
    proc = run_fit(1, *tiny_opts(run_dir, "--wandb", "--max-steps", "2"), env=env)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("wandb: no API key")]
    assert len(warnings) == 1 and "logging offline" in warnings[0] and "wandb sync" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr and len(offline_runs(run_dir)) == 1
    assert os.path.isfile(run_dir / "checkpoints" / "last.pt")
