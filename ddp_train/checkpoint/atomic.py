"""Durable file operations shared by both checkpoint formats: fsync a folder, a synced new file,
another name for a complete file, a directory removed without being seen half-deleted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The hidden temporary name `path` is written under before it is put in place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_synced(path: Path, write: Callable[[Any], None]) -> None:
    """Create `path`, fill it with `write(file)`, flush and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` a hard link to `src`, or a synced copy where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


def remove_dir(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted under its own name: rename it
    to a hidden name first (a leftover .trash-* from a crash is cleaned by the next save)."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def nbytes(obj: Any) -> int:
    """The bytes of a checkpoint dict's tensors: about what writing it needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0
