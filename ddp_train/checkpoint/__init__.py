"""Checkpoints: one contract, two formats. `plain` is one file written by rank 0; `sharded` is a
directory written by every rank through torch.distributed.checkpoint (FSDP). Both answer the same
calls (candidates, step_of, purge_steps, write); this module picks the format and adds what is the
same for both: the newest readable checkpoint, and reading one to resume or for its weights.

The sharded module is imported only when a sharded checkpoint is used (DCP takes most of a second
to import)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import UsageError
from . import plain
from .plain import FORMAT_VERSION, atomic_save, load
from .rundir import clean_temp_files, remove_all
from .saver import Checkpointer
from .state import load_weights, rng_state, set_rng_state, strip_prefixes

__all__ = ["FORMAT_VERSION", "Checkpointer", "atomic_save", "candidates", "clean_temp_files", "latest", "load",
           "load_checkpoint", "load_weights", "purge", "read", "remove_all", "rng_state", "set_rng_state",
           "strip_prefixes"]
log = logging.getLogger("ddp_train")


def _format(sharded: bool) -> ModuleType:
    if sharded:
        from . import sharded as module

        return module
    return plain


def candidates(ckpt_dir: Path, sharded: bool = False) -> list[Path]:
    """Complete checkpoints of one format in `ckpt_dir`, `last` first, then step-N newest first."""
    return _format(sharded).candidates(ckpt_dir)


def purge(ckpt_dir: Path, keep: int, sharded: bool = False) -> None:
    """Rank 0: delete the step-N checkpoints of one format beyond the newest `keep`."""
    _format(sharded).purge_steps(ckpt_dir, keep)


def latest(ckpt_dir: Path, sharded: bool = False) -> Path | None:
    """The readable checkpoint of one format with the most steps; None if there is none. Unreadable
    or corrupt ones are skipped with a warning naming the one used instead. If there are checkpoints
    but none is readable, that is an error: starting over would bury them."""
    fmt = _format(sharded)
    best: tuple[int, Path] | None = None
    errors = []
    for path in fmt.candidates(ckpt_dir):
        try:
            step = fmt.step_of(path)
        except UsageError as e:
            errors.append(str(e))
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        if errors:
            raise UsageError(f"no readable checkpoint in {ckpt_dir} ({errors[0]}); resume from a good copy with "
                             "--resume PATH, or start a new run with another --run-dir")
        return None
    for error in errors:
        log.warning("skipping %s; resuming from %s (step %d) instead", error, best[1], best[0])
    return best[1]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint to resume: the whole dict, or a sharded checkpoint's dict without the model and
    optimizer (those load into the sharded model, in place)."""
    if Path(path).is_dir():
        from . import sharded

        sharded.verify(path, "resume from another one (checkpoints/step-*) or start a new run with another "
                             "--run-dir")
        return sharded.read_extra(path)
    return plain.read_checkpoint(path)


def read(path: str | Path, fix: str = "use another checkpoint") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The one reader for fit's --init-from, evaluate, predict and export: (the bare module's state
    dict, the checkpoint's other contents or None for a plain state dict). A directory is a sharded
    (FSDP) checkpoint, gathered into one plain state dict in this process."""
    if Path(path).is_dir():
        from . import sharded

        sharded.verify(path, fix)
        return sharded.export(path), sharded.read_extra(path)
    raw = load(path, fix)
    if isinstance(raw, dict) and "version" in raw and "model" in raw:
        plain.check_format(raw, path)
        return raw["model"], raw
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UsageError(f"{path} is neither a ddp_train checkpoint nor a state dict of tensors; save one "
                         "with torch.save(model.state_dict(), path)")
    return strip_prefixes(raw), None
