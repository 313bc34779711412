"""The plain checkpoint format: one versioned dict in one file, written atomically by rank 0 and
sealed with a checksum (see integrity.py), loadable with torch.load(weights_only=True).

Layout of `ckpt_dir`: last.pt, best.pt and step-NNNNNNNN.pt, the last two hard links to a complete
last.pt (copies where links are not allowed)."""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from torch.torch_version import TorchVersion

from ..errors import UsageError, pickle_refusal
from ..integrity import Crc32Writer, check_plain
from ..safeio import discard, failure
from .atomic import fsync_dir, link_or_copy, nbytes, tmp_name

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """Temp file in the same folder, flush + fsync, os.replace, fsync the folder. The file is
    sealed with its checksum (see integrity.py). A failed write removes the temp file, leaves any
    old `path` as it was and raises WriteFailure."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            sealed = Crc32Writer(f)
            try:
                torch.save(obj, sealed)  # type: ignore[arg-type]  # any object with write(): torch's stub says IO[bytes]
            except RuntimeError:
                if sealed.error is None:
                    raise
                raise sealed.error from None
            sealed.seal()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        discard(tmp)
        raise failure("writing checkpoint", path, e, nbytes(obj)) from None


def atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` another name for the complete file `src` (a copy where links are not allowed)."""
    tmp = tmp_name(dst)
    try:
        tmp.unlink(missing_ok=True)
        link_or_copy(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as e:
        discard(tmp)
        raise failure("writing checkpoint", dst, e, src.stat().st_size) from None


def load(path: str | Path, fix: str = "resume from another checkpoint (checkpoints/step-*.pt) or start a new "
                                       "run with another --run-dir") -> dict[str, Any]:
    """Load a file with weights_only=True, checking its checksum (where it has one) before anything
    is returned; every failure is one UsageError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; check the path (checkpoints live in "
                         "RUN_DIR/checkpoints/)")
    # The checksum is computed in a thread while torch.load reads the same pages (zlib releases the
    # GIL): with a core to spare it adds little to the load (benchmarks/checksum_cost.py).
    with ThreadPoolExecutor(1, thread_name_prefix="ddp_train-checksum") as pool:
        checked = pool.submit(check_plain, path)
        loaded: Any = None  # whatever the file holds (judged after the checksum)
        error: Exception | None = None
        try:
            # Early checkpoints stored torch.__version__ as a TorchVersion (a str subclass): allow just that.
            with torch.serialization.safe_globals([TorchVersion]):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # judged below, once the checksum is known
            error = e
        try:
            status = checked.result()
        except OSError as e:
            status = f"unreadable: {e.strerror or e}"
    if status not in (None, "ok"):
        raise UsageError(f"checkpoint {path} is corrupt ({status}); {fix}")
    if error is not None:
        raise _load_error(path, error, fix) from None
    if status is None and isinstance(loaded, dict) and "checksum" in loaded:
        raise UsageError(f"checkpoint {path} is corrupt (its checksum trailer is missing); {fix}")
    return loaded


def _load_error(path: Path, e: Exception, fix: str) -> Exception:
    """What torch.load's failure means for the user, as one line."""
    if isinstance(e, pickle.UnpicklingError):
        if "Unsupported global" in str(e):
            found = re.search(r"GLOBAL (\S+)", str(e))
            return pickle_refusal(path, f"global {found.group(1) if found else '?'}")
        return UsageError(f"checkpoint {path} is corrupt (not a readable torch.save file); {fix}")
    if isinstance(e, (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
                      TypeError, AttributeError, struct.error, UnicodeDecodeError)):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UsageError(f"checkpoint {path} is truncated or corrupt ({first}); {fix}")
    return e


def check_format(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint written by a newer ddp_train."""
    if ckpt["version"] > FORMAT_VERSION:
        raise UsageError(f"{path} has checkpoint format {ckpt['version']}, newer than this ddp_train "
                         f"reads ({FORMAT_VERSION}); upgrade ddp_train")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A plain checkpoint to resume: the whole dict, checked to be one of ours in a format we read."""
    ckpt = load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "version" not in ckpt:
        raise UsageError(f"{path} is not a ddp_train checkpoint (no version/model keys); to start from "
                         "its weights use --init-from")
    check_format(ckpt, path)
    return ckpt


def candidates(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files, newest step first (temp files are never candidates)."""
    steps = [(int(m.group(1)), p) for p in ckpt_dir.glob("step-*.pt") if (m := STEP_FILE.search(p.name))]
    files = [p for _, p in sorted(steps, key=lambda pair: pair[0], reverse=True)]
    last = ckpt_dir / "last.pt"
    return ([last] if last.is_file() else []) + files


def step_of(path: Path) -> int:
    """The step a checkpoint was written at (a UsageError if it is unreadable)."""
    return int(read_checkpoint(path)["step"])


def purge_steps(ckpt_dir: Path, keep: int) -> None:
    """Rank 0: delete the step-N files beyond the newest `keep`."""
    for old in [p for p in candidates(ckpt_dir) if p.name != "last.pt"][keep:]:
        old.unlink(missing_ok=True)


def write(ckpt: dict[str, Any], ckpt_dir: Path, *, best: bool, step_file: bool, keep: int,
          written: Callable[[Path], None] = lambda path: None) -> Path:
    """Rank 0 only: last.pt, plus best.pt and step-N.pt as links to the same complete file.
    `written(last)` is called once last.pt is complete."""
    last = ckpt_dir / "last.pt"
    atomic_save(ckpt, last)
    written(last)
    if step_file:
        atomic_link(last, ckpt_dir / f"step-{ckpt['step']:08d}.pt")
        purge_steps(ckpt_dir, keep)
    if best:
        atomic_link(last, ckpt_dir / "best.pt")
    return last
