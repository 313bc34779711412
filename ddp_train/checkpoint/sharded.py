"""Sharded checkpoints (torch.distributed.checkpoint, DCP): every rank writes its own shards of the
model and optimizer state in parallel into one directory; DCP reshards on load, so a checkpoint
written by N ranks resumes on M ranks.

Layout of a checkpoint directory `ckpt_dir/NAME` (NAME = last, best, step-00001200):
    __0_0.distcp, __1_0.distcp, ...  each rank's shards (DCP FileSystemWriter)
    .metadata                        DCP's index of the shards (written by rank 0 inside dcp.save)
    extra.pt                         rank 0's plain dict (step, epoch, rng, config...), weights_only
    COMPLETE                         JSON {file: {"size": bytes, "crc32": checksum}} of all the
                                     above, fsynced, written last (before checksums: {file: size})

The directory is written under a temporary name and put in place by rename once COMPLETE is
written, so a process killed while saving leaves the previous checkpoint under NAME. Step and best
copies are hard links to the same (never modified) files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..errors import UsageError
from ..integrity import ALGORITHM, check_file, crc32_of
from ..safeio import failure
from .atomic import fsync_dir, link_or_copy, nbytes, remove_dir, write_synced
from .plain import load as load_plain
from .safe_dcp import SafeEmptyPlanner, SafeLoadPlanner, SafeReader, read_metadata, refusals
from .state import bare_key

log = logging.getLogger("ddp_train")
MARKER = "COMPLETE"
EXTRA = "extra.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


# --- files and directories ---------------------------------------------------------------------

def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); OSError where the
    platform or file system cannot (macOS, NFS, old kernels)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(code)}")


def _put_in_place(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` appear as `final`, replacing an old `final`.

    Where the file system can swap two directories atomically, a reader always finds a complete
    checkpoint under `final`, the old or the new. Elsewhere the old one is renamed to `.NAME.old`
    first, then the new one in, then the old one deleted: a crash between the two renames leaves
    `final` missing and `.NAME.old` complete, which `candidates` offers and the next save restores."""
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return
    try:
        _exchange(tmp, final)
        fsync_dir(final.parent)
        remove_dir(tmp)  # now the old checkpoint
        return
    except OSError as e:
        log.debug("atomic directory swap unavailable (%s); replacing in two renames", e)
    old = _old_name(final)
    remove_dir(old)
    os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    remove_dir(old)


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _recover(ckpt_dir: Path) -> None:
    """Rank 0, before writing: restore a checkpoint a crash left renamed away, drop leftovers."""
    for old in ckpt_dir.glob(".*.old"):
        final = ckpt_dir / old.name[1:-len(".old")]
        if not final.exists() and is_complete(old):
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for trash in ckpt_dir.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def _listed(path: Path) -> dict[str, dict[str, int]] | None:
    """The COMPLETE marker's {file: {"size": ..., "crc32": ...}} (older markers: sizes only), or None."""
    try:
        listed = json.loads((path / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(listed, dict) or ".metadata" not in listed or EXTRA not in listed:
        return None
    out = {}
    for name, entry in listed.items():
        entry = {"size": entry} if isinstance(entry, int) else entry
        if not (isinstance(entry, dict) and all(isinstance(v, int) for v in entry.values())):
            return None
        out[name] = entry
    return out


def is_complete(path: str | Path) -> bool:
    """True if `path` is a checkpoint directory whose COMPLETE marker exists and lists exactly the
    files present, with their sizes (a directory killed mid-write, or a copy missing or truncating
    a file, is not complete). Cheap: `verify` also checks the contents."""
    path = Path(path)
    listed = _listed(path)
    try:
        return listed is not None and {k: v["size"] for k, v in listed.items()} == _sizes(path)
    except (OSError, KeyError):
        return False


def verify(path: str | Path, fix: str) -> None:
    """Before a sharded checkpoint is used: complete, every file's checksum as recorded, and DCP's
    metadata safe to read (a UsageError naming `fix` otherwise)."""
    path = Path(path)
    listed = _listed(path) if is_complete(path) else None
    if listed is None:
        raise UsageError(f"{path} is not a complete sharded checkpoint (no valid {MARKER} marker listing its "
                         f"files: a save was interrupted, or a file is missing or truncated); {fix}")
    seen = (str(path.resolve()), json.dumps(listed, sort_keys=True))
    if seen in _VERIFIED:  # a resume checks the same checkpoint when choosing it and when loading it
        return
    for name, entry in sorted(listed.items()):
        problem = check_file(path / name, entry)
        if problem:
            raise UsageError(f"sharded checkpoint {path} is corrupt ({problem}); {fix}")
    read_metadata(path)
    _VERIFIED.add(seen)


_VERIFIED: set[tuple[str, str]] = set()  # (directory, its manifest) found intact in this process


def _check_plain(value: Any, where: str = "extra") -> None:
    """`extra` must load with torch.load(weights_only=True): tensors, numbers, strings, containers."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise UsageError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor))):
        raise UsageError(f"{where} is a {type(value).__name__}; a checkpoint's extra dict holds "
                         "tensors and plain values only (str, numbers, lists, dicts): convert it")


# --- save, load, export --------------------------------------------------------------------------

@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group, even when told so with no_dist=True."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model and optimizer state as this rank's shards (DTensors), keyed by parameter names."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _before_commit() -> None:
    """Test seam: called on rank 0 after all shards and extra.pt are written, before COMPLETE."""


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write (DCP wraps each rank's in a CheckpointException)."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, CheckpointException):
        for exc, _ in e.failures.values():
            found = _os_error(exc)
            if found is not None:
                return found
    cause = e.__cause__ or e.__context__
    return _os_error(cause) if cause is not None else None


def save(ckpt_dir: str | Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         extra: dict[str, Any], *, is_main: bool, barrier: Callable[[], None],
         gather: Callable[[Any], list[Any] | None] = lambda obj: [obj]) -> Path:
    """Collective (all ranks): write `ckpt_dir/name` as a sharded checkpoint and return its path.

    Each rank writes its own shards into `ckpt_dir/.name.tmp` (cleared first) and checksums them
    (`gather` brings every rank's checksums to rank 0); rank 0 adds `extra` (only its own copy is
    kept) and, once every rank is done, the COMPLETE marker, then puts the directory in place of
    any old `name`. Returns when the new checkpoint is in place. A failed write raises
    WriteFailure; the temporary directory is removed and the old `name` is untouched."""
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    _check_plain(extra)
    state = _state(model, optimizer)
    try:
        if is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _recover(ckpt_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        with _single_process_ok():
            dcp.save(state, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True),
                     no_dist=not dist.is_initialized())
        rank = dist.get_rank() if dist.is_initialized() else 0
        sums = gather({p.name: crc32_of(p) for p in tmp.glob(f"__{rank}_*.distcp")})
        if is_main:
            write_synced(tmp / EXTRA, lambda f: torch.save(extra, f))
        barrier()  # every rank's shards are on disk (dcp.save's last collective already implies it)
        if is_main:
            _before_commit()
            crcs = {k: v for rank_sums in sums or [] for k, v in rank_sums.items()}
            manifest = {n: {"size": size, ALGORITHM: crcs[n] if n in crcs else crc32_of(tmp / n)}
                        for n, size in _sizes(tmp).items()}
            write_synced(tmp / MARKER, lambda f: f.write(json.dumps(manifest, indent=0).encode()))
            fsync_dir(tmp)
            _put_in_place(tmp, final)
    except (OSError, CheckpointException) as e:
        error = _os_error(e)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise
        raise failure("writing sharded checkpoint", final, error, nbytes(state)) from None
    barrier()
    return final


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Collective (all ranks, any number of them): load the model's (and the optimizer's) state
    from a sharded checkpoint into the sharded model, in place, and return its `extra` dict. The
    model must be sharded (or bare) and the optimizer created exactly as when training. Also works
    in one process without a process group, into a bare model."""
    path = Path(path)
    verify(path, "resume from another one (checkpoints/step-*) or start a new run with another --run-dir")
    state = _state(model, optimizer)
    with _single_process_ok(), refusals(path):
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(),
                 no_dist=not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_extra(path)


def read_extra(path: str | Path) -> dict[str, Any]:
    """The checkpoint's extra dict (step, epoch...), without a process group (weights_only)."""
    return load_plain(Path(path) / EXTRA)


def export(path: str | Path) -> dict[str, torch.Tensor]:
    """The bare module's full state dict (plain CPU tensors, keys as in the unwrapped model's
    state_dict()) from a sharded checkpoint, in this process alone: no process group needed, none
    used if there is one. Loads only the model's tensors, not the optimizer's."""
    path = Path(path)
    verify(path, "use another checkpoint")
    state: dict[str, Any] = {}
    # dcp.load itself fills only the keys the given dict already has; the planner that rebuilds
    # the dict from the checkpoint's metadata needs the lower-level entry point (as in
    # torch.distributed.checkpoint.format_utils.dcp_to_torch_save, which would also read the
    # optimizer state).
    with _single_process_ok(), refusals(path):
        _load_state_dict(state, storage_reader=SafeReader(path), planner=SafeEmptyPlanner(keys={"model"}),
                         no_dist=True)
    return {bare_key(k): v for k, v in state["model"].items()}


# --- last, best, step copies ---------------------------------------------------------------------

def link_copy(src: str | Path, dst: str | Path) -> Path:
    """Not a collective (rank 0): make `dst` a copy of the complete checkpoint `src` whose files
    are hard links to `src`'s (plain copies where links are not allowed), replacing any old `dst`
    the same way `save` does."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    try:
        tmp.mkdir()
        for f in [p for p in files if p.name != MARKER] + [p for p in files if p.name == MARKER]:
            link_or_copy(f, tmp / f.name)
        fsync_dir(tmp)
        _put_in_place(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise failure("writing sharded checkpoint", dst, e, sum(f.stat().st_size for f in files)) from None
    return dst


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, `last` first, then step-N newest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = _step_dirs(ckpt_dir)
    last = ckpt_dir / "last"
    if not last.exists():
        last = _old_name(last)  # a crash between the two renames of a non-atomic replacement
    return [p for p in [last, *steps] if is_complete(p)]


def step_of(path: Path) -> int:
    """The step a checkpoint was written at (extra["step"]), once it is verified intact (a
    UsageError if it is corrupt or unreadable)."""
    try:
        verify(path, "skipped")
        return int(read_extra(path)["step"])
    except UsageError:
        raise
    except Exception as e:  # an unreadable extra.pt: say why
        raise UsageError(f"sharded checkpoint {path} is unreadable ({e})") from None


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    """The step-N entries of `ckpt_dir`, newest step first."""
    steps = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(steps, key=lambda pair: pair[0], reverse=True)]


def purge_steps(ckpt_dir: str | Path, keep: int) -> None:
    """Rank 0: delete the step-N directories beyond the newest `keep`."""
    ckpt_dir = Path(ckpt_dir)
    for old in _step_dirs(ckpt_dir)[keep:]:
        remove_dir(old)


def write(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
          extra: dict[str, Any], *, is_main: bool, barrier: Callable[[], None], best: bool = False,
          step_dir: bool = False, keep: int = 3, gather: Callable[[Any], list[Any] | None] = lambda obj: [obj]) -> Path:
    """Collective: `last`, plus `best` and `step-NNNNNNNN` (extra["step"]) as hard-linked copies,
    keeping the newest `keep` step directories (the sharded counterpart of plain.write)."""
    ckpt_dir = Path(ckpt_dir)
    last = save(ckpt_dir, "last", model, optimizer, extra, is_main=is_main, barrier=barrier, gather=gather)
    if is_main:
        if step_dir:
            link_copy(last, ckpt_dir / f"step-{int(extra['step']):08d}")
            purge_steps(ckpt_dir, keep)
        if best:
            link_copy(last, ckpt_dir / "best")
    barrier()
    return last
