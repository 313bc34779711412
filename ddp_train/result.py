"""What `fit` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED


@dataclass(frozen=True)
class FitResult:
    """What `fit` returns on every rank (the same values on each), and what `Stopped.result` holds.

    Attributes:
        status: "done" (the epochs or --max-steps ran), "early_stop" (--patience ran out),
            "nothing_to_do" (the run directory's checkpoint had already finished the run),
            "preempted" or "interrupted" (in a `Stopped` exception's `result` only).
        step: optimizer steps taken, in all (a resumed run counts its earlier steps).
        epoch: completed epochs.
        run_dir: the run directory: config.json, metrics.jsonl, checkpoints/.
        metrics: the last evaluation's figures: {"val_loss": ..., "val_<metric>": ...}; empty when
            this call evaluated nothing.
        best: {monitor: value, "step": step} of the best evaluation of the run (best.pt holds its
            weights when saved); empty before any evaluation.
        checkpoint: the newest checkpoint's path, None when none was written.

    Example::

        result = fit(MyTask(), epochs=3)
        if result.status == "done":
            print(f"val_loss {result.metrics['val_loss']:.4f} after {result.step} steps")
    """

    status: str  # done | early_stop | preempted | interrupted | nothing_to_do
    step: int  # optimizer steps taken, in all
    epoch: int  # completed epochs
    run_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation: val_loss, val_<metric>, ...
    best: dict[str, Any] = field(default_factory=dict)  # {monitor: value, "step": step} of best.pt
    checkpoint: str | None = None  # the newest checkpoint

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this result: 0, 3 (preempted) or 130 (interrupted)."""
        return {"preempted": EXIT_PREEMPTED, "interrupted": EXIT_INTERRUPTED}.get(self.status, EXIT_OK)
