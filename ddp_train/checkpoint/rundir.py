"""A run directory's checkpoints folder: what an interrupted save left, and clearing it."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import plain


def remove_all(ckpt_dir: Path) -> None:
    """Rank 0, for --resume never --overwrite: every checkpoint of either kind."""
    for path in plain.candidates(ckpt_dir) + [ckpt_dir / "best.pt"]:
        path.unlink(missing_ok=True)
    for folder in [p for p in ckpt_dir.glob("*") if p.is_dir()]:
        shutil.rmtree(folder, ignore_errors=True)


def clean_temp_files(ckpt_dir: Path) -> None:
    """Rank 0, before a run starts: what an interrupted save left (files, or sharded directories)."""
    for tmp in ckpt_dir.glob(".*.tmp*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
