"""Writing the run's files: never through a symbolic link out of the run directory, atomically
where a file is rewritten, and a failed write turned into one `WriteFailure` naming the bytes."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import UsageError, WriteFailure


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged user on the file system holding `path` (or its nearest parent)."""
    for folder in [path, *path.parents]:
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free
            return None
    return None


def discard(path: Path) -> None:
    """Remove a temp file after a failed write; a file system that refuses (read-only) keeps it."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def failure(what: str, path: Path, error: OSError, needed: int | None) -> WriteFailure:
    return WriteFailure(what, path, error, needed, free_bytes(path.parent))


def refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link; ddp_train writes its run files only inside the run "
                         f"directory: remove the link (rm {path}) and run again")


def open_append(path: Path) -> Any:
    """Line-buffered text append, refusing a symbolic link (O_NOFOLLOW: no race with a check)."""
    refuse_link(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if path.is_symlink():
            refuse_link(path)
        raise failure("opening", path, e, None) from None
    return os.fdopen(fd, "a", buffering=1, newline="")


def replace_text(path: Path, text: str) -> None:
    """Write `path` as a new file (temp file + rename: a link at `path` is replaced, not followed;
    a crash leaves the old or the new content). A failed write removes the temp file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        discard(tmp)
        raise failure("writing", path, e, len(text.encode())) from None


@contextlib.contextmanager
def writing(path: Path, needed: int | None) -> Iterator[None]:
    """An OSError inside becomes the WriteFailure of writing `path`."""
    try:
        yield
    except OSError as e:
        raise failure("writing", path, e, needed) from None
