"""A full disk during a save, for real: a run directory on a small tmpfs, filled after a first run,
then resumed. The run ends with at most one `error:` line per rank naming the file, the bytes needed and
free and the last complete checkpoint, exit 1, no temp files left, the previous checkpoint intact."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_fit
from ddp_train.config import FitConfig, dump_json
from ddp_train.errors import WriteFailure
from ddp_train.log import RunFiles

OPTS = ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "64", "--val-samples", "16",
        "--model", "mlp", "--hidden", "256,256", "--batch-size", "16", "--no-progress", "--optimizer", "adam"]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs (CI runs as root); skipped with the reason where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Take all but about `leave` bytes of the disk."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def _check(proc: subprocess.CompletedProcess, run_dir: Path, last: Path, ranks: int) -> str:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert 1 <= len(errors) <= ranks and "Traceback" not in proc.stderr.split("error:")[0], proc.stderr
    line = errors[0]
    assert re.search(rf"writing (sharded )?checkpoint {re.escape(str(run_dir))}/checkpoints/\S+ failed: No space "
                     r"left on device \(needs [\d.]+ (KB|MB), [\d.]+ (bytes|KB) free there\); the last complete "
                     rf"checkpoint is {re.escape(str(last))} \(step 4\); free space", line), line
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp" in p.name or ".trash" in p.name]
    assert leftovers == [], leftovers
    return line


def test_disk_full_during_a_plain_save_ends_the_run_in_one_line(small_disk):
    run_dir = small_disk / "run"
    run_fit(1, *OPTS, "--max-steps", "4", "--run-dir", str(run_dir))
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    _fill(small_disk, 64 * 1024)
    proc = run_fit(1, *OPTS, "--max-steps", "8", "--run-dir", str(run_dir), check=False)
    print(_check(proc, run_dir, last, ranks=1))
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["step"] == 4


def test_disk_full_during_a_sharded_save_ends_the_run_and_keeps_the_previous_checkpoint(small_disk):
    """Under torchrun: the agent ends the other rank once one exits; this checks the line and the files."""
    run_dir = small_disk / "run"
    run_fit(2, *OPTS, "--strategy", "fsdp", "--max-steps", "4", "--run-dir", str(run_dir))
    last = run_dir / "checkpoints" / "last"
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    _fill(small_disk, 64 * 1024)
    proc = run_fit(2, *OPTS, "--strategy", "fsdp", "--max-steps", "8", "--run-dir", str(run_dir), check=False)
    print(_check(proc, run_dir, last, ranks=2))
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before


def test_disk_full_while_writing_run_files_names_the_file(small_disk):
    run_dir = small_disk / "run"
    run_dir.mkdir()
    files = RunFiles(run_dir)
    _fill(small_disk, 0)
    row = {"epoch": 1, "step": 4, "train_loss": 1.0}
    for path, write in ((run_dir / "history.csv", lambda: files.history_row(row)),
                        (run_dir / "metrics.jsonl", lambda: files.event("train", step=4, loss=1.0)),
                        (run_dir / "config.json", lambda: dump_json(FitConfig(), {}, run_dir / "config.json"))):
        with pytest.raises(WriteFailure) as failure:
            for _ in range(1000):  # a partly used page may take a few lines first
                write()
        assert str(failure.value).startswith(f"writing {path} failed: No space left on device (needs ")
    assert sorted(p.name for p in run_dir.iterdir()) == ["history.csv", "metrics.jsonl"]  # no temp file left


def test_a_read_only_file_system_is_one_line_and_keeps_the_checkpoint(small_disk):
    from ddp_train.checkpoint import plain

    ckpt_dir = small_disk / "checkpoints"
    ckpt_dir.mkdir()
    state = {"version": plain.FORMAT_VERSION, "step": 2, "model": {"w": torch.ones(1000)}}
    plain.write(state, ckpt_dir, best=False, step_file=False, keep=1)
    before = (ckpt_dir / "last.pt").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # a read-only remount
    with pytest.raises(WriteFailure) as failure:
        plain.write({**state, "step": 4}, ckpt_dir, best=False, step_file=False, keep=1)
    assert str(failure.value).startswith(f"writing checkpoint {ckpt_dir / 'last.pt'} failed: Read-only file system")
    assert (ckpt_dir / "last.pt").read_bytes() == before and [p.name for p in ckpt_dir.iterdir()] == ["last.pt"]
