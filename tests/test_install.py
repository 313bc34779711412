"""Installing: `make fit` can take PyTorch's CPU-only build, and the editable install it does
prints no warning block (pip >= 25 shows the build backend's warnings)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def make_n(*args: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_fit_takes_the_cpu_build_when_asked(tmp_path):
    venv = f"VENV={tmp_path / 'v'}"
    cpu = make_n("fit", venv, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    [torch] = [i for i, ln in enumerate(cpu) if "install -q torch torchvision" in ln]
    assert cpu[torch].endswith("--index-url https://download.pytorch.org/whl/cpu")
    assert torch < next(i for i, ln in enumerate(cpu) if "install -q -e" in ln)  # before the package needs it
    assert not [ln for ln in make_n("fit", venv) if "torchvision" in ln]  # by default: pip's own choice


def test_the_editable_install_builds_without_a_warning(tmp_path):
    """setuptools' meta path finder (its strategy for a package at the project root) warned on every
    install; package-dir makes it the plain .pth entry, which only logs (pip shows warnings only)."""
    pytest.importorskip("setuptools", minversion="77")  # what pyproject.toml's build-system requires
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ddp_train", src / "ddp_train", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_editable(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path / "wheel")], cwd=src,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # -W error: a warning (what pip shows) fails the build
    assert "!!" not in proc.stderr, proc.stderr[-3000:]  # setuptools' warning block
