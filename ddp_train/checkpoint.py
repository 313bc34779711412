"""Checkpoints: one versioned plain dict, written atomically by rank 0, loadable with weights_only."""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import struct
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from torch.torch_version import TorchVersion

from .errors import UsageError, WriteFailure, pickle_refusal
from .integrity import ALGORITHM, Crc32Writer, check_plain
from .safeio import discard, failure

log = logging.getLogger("ddp_train")
FORMAT_VERSION = 1
STEP_FILE = re.compile(r"step-(\d+)\.pt$")
# Checkpoint entries that training never changes, so a snapshot need not walk them: the RNG states
# are fresh copies (rng_state, gather_object), the config and versions plain values built once.
UNCHANGING = frozenset({"rng", "config", "versions"})


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own device only (the current one): get_rng_state_all() holds one state per
        # visible GPU, which a resume with fewer visible GPUs, or this rank on another index, cannot use.
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible at save time
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached"]))


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_save(obj: Any, path: Path) -> None:
    """Temp file in the same folder, flush + fsync, os.replace, fsync the folder. The file is
    sealed with its checksum (see integrity.py). A failed write removes the temp file, leaves any
    old `path` as it was and raises WriteFailure."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            sealed = Crc32Writer(f)
            try:
                torch.save(obj, sealed)
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


def nbytes(obj: Any) -> int:
    """The bytes of a checkpoint dict's tensors: about what writing it needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` another name for the complete file `src` (a copy where links are not allowed)."""
    tmp = _tmp_name(dst)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
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
        loaded, error = None, None
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint to resume: the whole dict, or a sharded checkpoint's dict without the model and
    optimizer (those load into the sharded model, in place)."""
    if Path(path).is_dir():
        from . import sharded

        sharded.verify(path, "resume from another one (checkpoints/step-*) or start a new run with another "
                             "--run-dir")
        return sharded.read_extra(path)
    ckpt = load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "version" not in ckpt:
        raise UsageError(f"{path} is not a ddp_train checkpoint (no version/model keys); to start from "
                         "its weights use --init-from")
    if ckpt["version"] > FORMAT_VERSION:
        raise UsageError(f"{path} has checkpoint format {ckpt['version']}, newer than this ddp_train "
                         f"reads ({FORMAT_VERSION}); upgrade ddp_train")
    return ckpt


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
        if raw["version"] > FORMAT_VERSION:
            raise UsageError(f"{path} has checkpoint format {raw['version']}, newer than this ddp_train "
                             f"reads ({FORMAT_VERSION}); upgrade ddp_train")
        return raw["model"], raw
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UsageError(f"{path} is neither a ddp_train checkpoint nor a state dict of tensors; save one "
                         "with torch.save(model.state_dict(), path)")
    return strip_prefixes(raw), None


class Checkpointer:
    """Collective saves of the run's state and where the newest one is. `state(rngs)` builds the
    checkpoint dict on rank 0. Plain checkpoints: rank 0 writes one file. Sharded (FSDP) ones:
    every rank writes its shards of `model` and `optimizer`; the rest of the dict goes along.

    Plain checkpoints are copied to host memory at once (a consistent snapshot) and written,
    fsynced and linked by a background thread on rank 0 while training goes on; one write is in
    flight at most. An evaluation's checkpoint is written only when `interval` seconds have passed
    since the previous write (so a run of short epochs does not spend its time on the disk); a
    better one that is not written yet is kept in memory and written as best.pt with the next."""

    def __init__(self, ckpt_dir: Path, comm: Any, keep: int, state: Callable[[list[Any] | None, bool], dict[str, Any]],
                 step: Callable[[], int], sharded_with: tuple[Any, Any] | None = None, interval: float = 0.0):
        self.ckpt_dir, self.comm, self.keep, self.state, self.step = ckpt_dir, comm, keep, state, step
        self.sharded_with = sharded_with  # (model, optimizer) for sharded checkpoints
        self.interval = interval
        self.last: tuple[Path, int] | None = None  # (path, step) of the newest checkpoint (rank 0's word)
        self.complete: tuple[Path, int] | None = None  # rank 0: the newest one known to be on disk
        self._writer: _Write | None = None
        self._written_at: float | None = None  # rank 0: when the newest write started
        self._best: dict[str, Any] | None = None  # rank 0: the best evaluation's snapshot, not on disk yet

    def save(self, *, best: bool = False, step_file: bool = False, durable: bool = False) -> Path:
        """Every rank's RNG state goes to rank 0. `step_file` and `durable` checkpoints are always
        written; an evaluation's (neither) when the interval has passed. With `durable`, all ranks
        return once it is on disk; otherwise rank 0 may still be writing it (see `flush`)."""
        rngs = self.comm.gather_object(rng_state())
        main = self.comm.env.is_main
        last = self.ckpt_dir / "last.pt"
        if self.sharded_with is not None:
            from . import sharded

            model, optimizer = self.sharded_with
            extra = self.state(rngs, False) if main else {}
            try:
                last = sharded.write(self.ckpt_dir, model, optimizer, extra, is_main=main,
                                     barrier=self.comm.barrier, best=best, step_dir=step_file, keep=self.keep,
                                     gather=self.comm.gather_object)
            except WriteFailure as e:
                e.last_checkpoint = self.describe_complete()
                raise
            self.last = self.complete = (last, self.step())
            return last
        if main:
            now = time.monotonic()
            due = durable or step_file or self._written_at is None or now - self._written_at >= self.interval
            if due or best:
                state = {k: v if k in UNCHANGING else _snapshot(v) for k, v in self.state(rngs, True).items()}
                state["checksum"] = ALGORITHM  # the file must carry one: see integrity.py
                if due:
                    self._write(state, best, step_file, now)
                    self.last = (last, state["step"])
                else:
                    self._best = state
            if durable:
                self.flush()
        elif durable or step_file:  # written for sure; whether an evaluation's was, rank 0 alone knows
            self.last = (last, self.step())
        if durable:
            self.comm.barrier()
        return last

    def _write(self, state: dict[str, Any], best: bool, step_file: bool, now: float) -> None:
        self.flush()
        older_best, self._best = (None if best else self._best), None
        self._written_at = now

        def work() -> None:
            if older_best is not None:
                atomic_save(older_best, self.ckpt_dir / "best.pt")
            write(state, self.ckpt_dir, best=best, step_file=step_file, keep=self.keep,
                  written=lambda path: setattr(self, "complete", (path, state["step"])))

        self._writer = _Write(work)

    def flush(self) -> None:
        """Not a collective: wait for rank 0's write in flight, if any; its error is raised here."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.result()
        except WriteFailure as e:
            self.last = self.complete
            e.last_checkpoint = self.describe_complete()
            raise

    def describe_complete(self) -> str:
        """Rank 0, not waiting for a write in flight: the newest checkpoint known to be complete."""
        if self.complete is None:
            return "no checkpoint was written before it"
        return f"the last complete checkpoint is {self.complete[0]} (step {self.complete[1]})"

    def close(self) -> None:
        """Not a collective, for a run that ends on an error: write a better evaluation that is not
        on disk yet as best.pt, and wait for the writes."""
        if self._best is not None:
            self.flush()
            best, self._best = self._best, None
            self._writer = _Write(lambda: atomic_save(best, self.ckpt_dir / "best.pt"))
        self.flush()

    def describe_last(self) -> str:
        failed = self.last[1] if self.last else 0
        try:
            self.flush()
        except WriteFailure as e:
            return f"writing the checkpoint of step {failed} failed ({e.error.strerror or e.error}); {e.last_checkpoint}"
        if self.last is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is {self.last[0]} (step {self.last[1]})"


def _snapshot(obj: Any) -> Any:
    """A copy in host memory of a checkpoint dict's tensors, so that training can go on while it is
    written. GPU tensors go to pinned memory without blocking, one wait for all of them at the end
    (a pageable copy blocks per tensor at a fraction of the bandwidth); the pinned blocks return to
    torch's host cache when the write is done, for the next snapshot."""
    on_gpu: list[bool] = []
    copy = _copy(obj, on_gpu)
    if on_gpu:
        torch.cuda.synchronize()
    return copy


def _copy(obj: Any, on_gpu: list[bool]) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            on_gpu.append(True)
            return torch.empty_like(obj, device="cpu", pin_memory=True).copy_(obj.detach(), non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy(v, on_gpu) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        return type(obj)(_copy(v, on_gpu) for v in obj)
    return obj  # plain values, and lists of them, are not changed by training


class _Write(threading.Thread):
    """One checkpoint write in a thread of its own; `result()` joins it and re-raises its error."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(name="ddp_train-checkpoint", daemon=False)
        self.fn, self.error = fn, None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as e:  # handed to the training thread by result()
            self.error = e

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def find_latest_any(ckpt_dir: Path, sharded_run: bool) -> Path | None:
    if sharded_run:
        from . import sharded

        return sharded.find_latest(ckpt_dir)
    return find_latest(ckpt_dir)


def remove_all(ckpt_dir: Path) -> None:
    """Rank 0, for --resume never --overwrite: every checkpoint of either kind."""
    for path in candidates(ckpt_dir) + [ckpt_dir / "best.pt"]:
        path.unlink(missing_ok=True)
    for folder in [p for p in ckpt_dir.glob("*") if p.is_dir()]:
        shutil.rmtree(folder, ignore_errors=True)


def candidates(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files, newest step first (temp files are never candidates)."""
    files = [p for p in ckpt_dir.glob("step-*.pt") if STEP_FILE.search(p.name)]
    files.sort(key=lambda p: int(STEP_FILE.search(p.name).group(1)), reverse=True)
    last = ckpt_dir / "last.pt"
    return ([last] if last.is_file() else []) + files


def find_latest(ckpt_dir: Path) -> Path | None:
    """The valid checkpoint with the most steps; unreadable or corrupt files are skipped with a
    warning naming the one used instead. If there are checkpoints but none is readable, that is an
    error: starting over would bury them."""
    best: tuple[int, Path] | None = None
    errors = []
    for path in candidates(ckpt_dir):
        try:
            step = int(load_checkpoint(path)["step"])
        except UsageError as e:
            errors.append(str(e))
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None and errors:
        raise UsageError(f"no readable checkpoint in {ckpt_dir} ({errors[0]}); resume from a good copy with "
                         "--resume PATH, or start a new run with another --run-dir")
    for error in errors:
        log.warning("skipping %s; resuming from %s (step %d) instead", error, best[1], best[0])
    return best[1] if best else None


def purge_steps(ckpt_dir: Path, keep: int) -> None:
    for old in [p for p in candidates(ckpt_dir) if p.name != "last.pt"][keep:]:
        old.unlink(missing_ok=True)


def clean_temp_files(ckpt_dir: Path) -> None:
    """Rank 0, before a run starts: what an interrupted save left (files, or sharded directories)."""
    for tmp in ckpt_dir.glob(".*.tmp*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


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


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Accept state dicts saved from DDP/DataParallel or torch.compile wrappers."""
    out = {}
    for key, value in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str, strict: bool = True) -> None:
    """load_state_dict with a one-line error naming the first mismatching keys and shapes."""
    own = model.state_dict()
    shape_diff = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shape_diff or (strict and (missing or unexpected)):
        parts = []
        if shape_diff:
            parts.append("shape mismatch: " + "; ".join(shape_diff[:3]))
        if strict and missing:
            parts.append("missing: " + ", ".join(missing[:3]))
        if strict and unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:3]))
        raise UsageError(f"{source} does not fit this model ({'; '.join(parts)}); check --model and the "
                         f"data's shape/classes{', or pass --no-init-strict for a partial load' if strict else ''}")
    model.load_state_dict(state, strict=strict)
