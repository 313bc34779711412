"""When to evaluate, which evaluation is best, when to stop early and when to write checkpoints.

Pure bookkeeping on synced values: every rank holds the same Policy and decides the same."""

from __future__ import annotations

import math
from typing import Any

from .config import FitConfig


class Policy:
    def __init__(self, cfg: FitConfig):
        self.monitor, self.mode, self.patience = cfg.monitor, cfg.monitor_mode(), cfg.patience
        self.eval_every, self.save_every = cfg.eval_every, cfg.save_every
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def eval_due(self, step: int, epoch_ended: bool, last_step: bool) -> bool:
        """Every epoch by default; with --eval-every, every that many steps and at the very end."""
        if self.eval_every is None:
            return epoch_ended or last_step
        return step % self.eval_every == 0 or last_step

    def step_file_due(self, step: int) -> bool:
        return bool(self.save_every and step % self.save_every == 0)

    def observe(self, results: dict[str, float], step: int) -> tuple[bool, bool]:
        """(improved, stop early). A non-finite value is never best."""
        value = results[self.monitor]
        finite = math.isfinite(value)
        better = finite and (self.best is None or (value < self.best if self.mode == "min" else value > self.best))
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better, bool(self.patience and self.bad_evals >= self.patience)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "bad_evals": self.bad_evals,
                "patience": self.patience, "best_step": self.best_step}

    def load_state_dict(self, best: float | None, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = best, state.get("bad_evals", 0)
        self.best_step = state.get("best_step")
