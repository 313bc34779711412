"""Run identity: the identical command (same settings, same number of processes) finds its default
run directory again; any other command gets one of its own; adding an option later leaves the
names of existing run directories alone. And `ddp-torchrun` adds no launcher traceback to a
worker's own `error:` line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_env
from ddp_train.config import FitConfig
from ddp_train.train import default_run_dir

BASE = FitConfig(model="mlp")  # what `ddp-train fit` runs (the digits' own model filled in)


def test_the_default_command_keeps_its_directory_name_across_releases():
    # Pinned: a change here strands every user's default run directory (the identical command
    # would start over instead of continuing). Change it only on purpose, and say so.
    assert default_run_dir(BASE, 1) == Path("runs/digits-mlp-c7e45094")


@pytest.mark.parametrize("other", [
    {"epochs": 3}, {"max_steps": 5}, {"lr": 0.01}, {"wandb": True}, {"workers": 2}, {"init_from": "w.pt"},
])
def test_any_other_setting_is_another_run(other):
    assert default_run_dir(BASE.replace(**other), 1) != default_run_dir(BASE, 1)


@pytest.mark.parametrize("same", [{"debug": True}, {"progress": False}, {"log_all_ranks": True},
                                  {"resume": "never"}, {"overwrite": True}, {"epochs": 10}])
def test_how_a_run_is_invoked_or_shown_is_not_its_identity(same):
    assert default_run_dir(BASE.replace(**same), 1) == default_run_dir(BASE, 1)  # epochs 10: the default


def test_the_number_of_processes_is_part_of_it_unless_the_global_batch_is_fixed():
    assert default_run_dir(BASE, 2) != default_run_dir(BASE, 1)
    fixed = BASE.replace(global_batch_size=64)
    assert default_run_dir(fixed, 2) == default_run_dir(fixed, 1)  # the same trajectory at any world size


def test_an_option_added_later_with_a_default_leaves_existing_run_directories_resolvable():
    later = dataclasses.make_dataclass("LaterFitConfig", [("new_option", int, dataclasses.field(default=5))],
                                       bases=(FitConfig,), frozen=True)
    for settings in ({}, {"lr": 0.01, "epochs": 3}):
        assert default_run_dir(later(model="mlp", **settings), 1) == default_run_dir(BASE.replace(**settings), 1)
    assert default_run_dir(later(model="mlp", new_option=6), 1) != default_run_dir(BASE, 1)


def _ddp_torchrun(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(body)
    return subprocess.run([sys.executable, "-m", "ddp_train.torchrun", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=base_env(), timeout=120)


def test_ddp_torchrun_keeps_the_workers_code_and_adds_no_traceback(tmp_path):
    proc = _ddp_torchrun(tmp_path, "import os, sys, time\n"  # rank 1 is still running: torchrun SIGTERMs it
                                   "if os.environ['RANK'] == '0':\n    print('error: bad input', file=sys.stderr)\n"
                                   "    sys.exit(2)\ntime.sleep(60)\n")
    assert proc.returncode == 2, proc.stderr
    assert "error: bad input" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert "failed (exitcode" not in proc.stderr and "closing signal" not in proc.stderr, proc.stderr


def test_ddp_torchrun_names_a_worker_killed_by_a_signal(tmp_path):
    proc = _ddp_torchrun(tmp_path, "import os, signal, time\n"
                                   "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                                   "time.sleep(60)\n")
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 (pid "), proc.stderr
    assert "killed by SIGKILL" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
