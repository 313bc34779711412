"""What `fit` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED


@dataclass(frozen=True)
class FitResult:
    status: str  # done | early_stop | preempted | interrupted | nothing_to_do
    step: int  # optimizer steps taken, in all
    epoch: int  # completed epochs
    run_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation: val_loss, val_<metric>, ...
    best: dict[str, Any] = field(default_factory=dict)  # {monitor: value, "step": step} of best.pt
    checkpoint: str | None = None  # the newest checkpoint

    @property
    def exit_code(self) -> int:
        return {"preempted": EXIT_PREEMPTED, "interrupted": EXIT_INTERRUPTED}.get(self.status, EXIT_OK)
