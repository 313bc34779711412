"""Every command in README.md, run in the order written on a fresh copy of the checkout, does what
the README says: it exits 0 with no `error:` line or traceback, a command the README says finds its
finished run prints `nothing to do`, and every other one trains a run of its own (the README's
commands used to collide in one default run directory). Commands that need what this machine may
not have are listed in SKIP, with the reason."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs_blocks import ROOT, blocks, commands

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
# The README's commands that this test does not run, and why.
SKIP = {
    "make fit TORCH_INDEX=": "downloads PyTorch's CPU-only build (a network and ~200 MB)",
    "sbatch ": "needs a Slurm cluster (tests/test_slurm.py runs the scripts on one)",
    "make test": "runs this test suite (and so this test) again",
}


def fresh_copy(dest: Path) -> Path:
    """The checkout as a clone would have it (tracked and new files, nothing ignored), with the venv
    running these tests standing in for the one `make fit` would create."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def readme_commands() -> list[str]:
    return [cmd for block in blocks(README) if block.lang in ("bash", "sh") for cmd in commands(block)]


def test_the_readme_commands_in_order(tmp_path):
    repo = fresh_copy(tmp_path / "ddp_train")
    bin_dir = repo / ".venv" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    transcript, trained = [], 0
    for command in readme_commands():
        reason = next((why for start, why in SKIP.items() if command.startswith(start)), None)
        if reason:
            transcript.append(f"$ {command}\n(skipped: {reason})")
            continue
        if command == "source .venv/bin/activate":
            env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(repo / ".venv"))
            continue
        shell = command.split("#")[0].strip()
        if shell == "make fit":  # the venv is already there: make must not rebuild it
            shell = "make -o .venv/.installed fit"
        proc = subprocess.run(["bash", "-c", shell], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        tail = "\n".join(ln for ln in out.splitlines() if re.match(r"(done|nothing to do|error)", ln))
        transcript.append(f"$ {command}\n{tail}")
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{out}"
        assert "error:" not in out and "Traceback" not in out, f"{command}\n{out}"
        if "nothing to do" in command:
            assert "nothing to do: the run in runs/" in out, f"{command}\n{out}"
        else:
            assert "done:" in out and "nothing to do" not in out and "resumed from" not in out, f"{command}\n{out}"
            trained += 1
    print("\n\n".join(transcript))
    assert trained >= 6, transcript
    runs = sorted(p.name for p in (repo / "runs").iterdir())
    assert len(runs) == trained, runs  # each command that trained has a directory of its own
    shown = set(re.findall(r"run dir (runs/[\w.-]+)", README.read_text()))
    assert shown and all((repo / path / "checkpoints" / "last.pt").is_file() for path in shown), (shown, runs)
