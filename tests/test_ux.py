"""First-contact usability: the launch scripts find torchrun without an activated venv, the Slurm
test cluster counts the real cores, packaging metadata, grouped `fit --help`, `--version`, and
"did you mean" hints for model names, TOML keys and options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, base_env

VENV = Path(sys.executable).parent.parent  # the venv running the tests: it has torchrun
BARE_PATH = "/usr/bin:/bin"  # no venv on it


def checkout(tmp_path: Path, script: str, venv: Path | None) -> Path:
    """A copy of launch/SCRIPT in a fake checkout whose .venv is VENV (or absent)."""
    (tmp_path / "launch").mkdir(parents=True)
    copy = tmp_path / "launch" / script
    shutil.copy2(ROOT / "launch" / script, copy)
    if venv is not None:
        (tmp_path / ".venv").symlink_to(venv)
    return copy


def fake_venv(folder: Path) -> Path:
    """A venv whose bin/torchrun only prints its arguments (to see which torchrun a script picks)."""
    (folder / "bin").mkdir(parents=True)
    stub = folder / "bin" / "torchrun"
    stub.write_text(f'#!/bin/sh\necho "{folder.name} torchrun $*"\n')
    stub.chmod(0o755)
    return folder


MULTINODE_VARS = {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1"}


def launch(script: Path, *args: str, path: str = BARE_PATH, **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in base_env(PATH=path, **variables).items() if k != "TORCHRUN"}
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_local_sh_runs_the_checkouts_venv_torchrun_without_path(tmp_path):
    """The real torchrun of the repo's .venv, with nothing of the venv on PATH: `fit --help` runs."""
    script = checkout(tmp_path, "local.sh", VENV)
    proc = launch(script, "--help", NPROC="1")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: " in proc.stdout and "--batch-size" in proc.stdout, proc.stdout


@pytest.mark.parametrize("script, variables", [("local.sh", {"NPROC": "1"}), ("multinode.sh", MULTINODE_VARS)])
def test_launch_scripts_prefer_path_then_the_checkouts_venv(tmp_path, script, variables):
    copy = checkout(tmp_path / "repo", script, fake_venv(tmp_path / "repo-venv"))
    proc = launch(copy, "--epochs", "1", **variables)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("repo-venv torchrun ") and proc.stdout.rstrip().endswith("fit --epochs 1")
    active = fake_venv(tmp_path / "active-venv")  # an activated venv comes first on PATH
    proc = launch(copy, "--epochs", "1", path=f"{active / 'bin'}:{BARE_PATH}", **variables)
    assert proc.stdout.startswith("active-venv torchrun "), proc.stdout + proc.stderr


@pytest.mark.parametrize("script, variables", [("local.sh", {"NPROC": "1"}), ("multinode.sh", MULTINODE_VARS)])
def test_launch_scripts_without_torchrun_say_make_fit(tmp_path, script, variables):
    copy = checkout(tmp_path, script, None)
    proc = launch(copy, **variables)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "torchrun not found" in lines[0] and "make fit" in lines[0], proc.stderr


def test_slurm_cluster_nodes_get_every_core_even_with_omp_num_threads_1():
    """slurm.conf's CPUs= comes from host_cpus: OMP_NUM_THREADS=1 (what the tests export) must not make it 1."""
    script = ROOT / "ci" / "slurm-cluster.sh"
    assert "cpus=$(host_cpus)" in script.read_text()
    proc = subprocess.run(["bash", "-c", f"source {script} && host_cpus"], capture_output=True, text=True,
                          timeout=30, env=base_env(OMP_THREAD_LIMIT="1"))  # OMP_NUM_THREADS=1 too
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(os.sched_getaffinity(0))


def test_package_metadata_builds_without_deprecation_warnings(tmp_path):
    """setuptools reads pyproject.toml without a warning (a license table is deprecated since 77)."""
    pytest.importorskip("setuptools", minversion="77")  # what pyproject.toml's build-system requires
    for name in ("pyproject.toml", "README.md", "ddp_train/__init__.py"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / "src" / name)
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path)], cwd=tmp_path / "src",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr, proc.stderr
    metadata = (tmp_path / proc.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "Version: 0.1.0" in metadata
