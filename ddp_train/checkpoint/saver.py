"""The background saver: collective saves of the run's state, written by a thread on rank 0 for
plain checkpoints and by every rank for sharded ones."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import WriteFailure
from ..integrity import ALGORITHM
from .plain import atomic_save, write
from .state import UNCHANGING, rng_state, snapshot


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
                state = {k: v if k in UNCHANGING else snapshot(v) for k, v in self.state(rngs, True).items()}
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


class _Write(threading.Thread):
    """One checkpoint write in a thread of its own; `result()` joins it and re-raises its error."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(name="ddp_train-checkpoint", daemon=False)
        self.fn = fn
        self.error: BaseException | None = None
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
