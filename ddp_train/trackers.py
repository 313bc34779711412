"""Experiment trackers besides wandb (log.py): TensorBoard event files, and several trackers at once.

Each tracker gets the same values at the same optimizer steps: every evaluation's history.csv row
(val_<name> as val/<name>), the train/ values every --log-every steps, and a Task's own values
(task/<name>, see Task.log). Only rank 0 has trackers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import UsageError
from .log import Tracker


def check_tensorboard() -> None:
    """On every rank before training, so that a missing package stops every rank the same way."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'ddp-train[tensorboard]' "
                         "(or pip install tensorboard), or drop --tensorboard")


class TensorBoardTracker(Tracker):
    """Event files in `log_dir`. A resumed run continues the step axis: events the interrupted run
    wrote after its checkpoint (`resumed_at`) are purged, as history.csv's rows are."""

    def __init__(self, log_dir: Path, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, values: dict[str, Any], step: int) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, step)

    def finish(self, exit_code: int) -> None:
        self._writer.close()


class Trackers(Tracker):
    """Several trackers as one (the wandb run's id is the checkpoint's)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.run_id), None)

    def log(self, values: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def finish(self, exit_code: int) -> None:
        for tracker in self.trackers:
            tracker.finish(exit_code)
