"""Rank-aware output: console and progress on rank 0, run files, and the experiment tracker.

Rank 0 gets real sinks; every other rank gets null objects with the same interface, so the loop
calls them unconditionally.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import repair
from .safeio import open_append, refuse_link, replace_text, writing

if TYPE_CHECKING:
    from rich.progress import Progress as Bar, TaskID

WandbMode = Literal["online", "offline", "disabled"]

log = logging.getLogger("ddp_train")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: while the progress bar is live that is rich's
    proxy, which prints the line above the bar (a handler holding the original stream wrote onto
    the bar's line)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def epoch_label(epoch: int, epochs: int | None) -> str:
    """`epoch 2/10`; `epoch 2` when --max-steps (or a stream) ends the run, not the epochs."""
    return f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}"


def setup_logging(rank: int, all_ranks: bool) -> None:
    handler = _Stderr()
    prefix = f"[rank {rank}] " if all_ranks else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 or all_ranks else logging.ERROR)


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class Progress:
    """A rich progress bar on stderr when rank 0 writes to a terminal (`console`: another one);
    plain periodic lines otherwise. The bar counts the run's steps toward its end; log lines print
    above it."""

    def __init__(self, enabled: bool, console: Any = None):
        self._bar: Bar | None = None
        if enabled and (console is not None or sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True,
                            console=console or Console(stderr=True))
            self._bar.start()
        self._task: TaskID | None = None

    def start_epoch(self, epoch: int, epochs: int | None, total: int, done: int) -> None:
        """Epoch `epoch` of `epochs` (None: the steps end the run) begins; `done` of the run's
        `total` steps are done."""
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task(epoch_label(epoch, epochs), total=total, completed=done, info="")
        else:
            self._bar.update(self._task, description=epoch_label(epoch, epochs), completed=done)

    def advance(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task)

    def show(self, line: str) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, info=line)
        else:
            log.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class NullProgress(Progress):
    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def show(self, line: str) -> None:
        pass


class RunFiles:
    """history.csv (one row per epoch) and metrics.jsonl (one line per event), on rank 0. Never
    written through a symbolic link; a failed write is a WriteFailure naming the file."""

    def __init__(self, run_dir: Path):
        self.history = run_dir / "history.csv"
        self.metrics = run_dir / "metrics.jsonl"
        refuse_link(self.history)
        self._jsonl = open_append(self.metrics)
        self._rows: Any = None  # history.csv, opened at its first row and kept open (line-buffered)

    def truncate_after(self, step: int) -> None:
        """On resume, rebuild both files to `step` from their intact lines (rows written after the
        checkpoint will be written again; a torn or unreadable line is dropped, never a good one)."""
        if self.history.exists():
            text, dropped = repair.history(self.history.read_text(errors="replace"), step)
            if text is None:
                aside = self.history.with_name(f"history.csv.unreadable-{int(time.time())}")
                self.history.rename(aside)
                log.warning("%s has no readable header; kept aside as %s, a new one starts", self.history, aside)
            else:
                replace_text(self.history, text)
            if dropped:
                log.warning("%s: dropped %d torn or unreadable row(s), kept the rest", self.history, dropped)
        if self.metrics.exists():
            text, dropped = repair.metrics(self.metrics.read_text(errors="replace"), step)
            self._jsonl.close()
            replace_text(self.metrics, text)
            self._jsonl = open_append(self.metrics)
            if dropped:
                log.warning("%s: dropped %d torn or unreadable line(s), kept the rest", self.metrics, dropped)

    def event(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
        with writing(self.metrics, len(line)):
            self._jsonl.write(line)

    def history_row(self, row: dict[str, Any]) -> None:
        if self._rows is None:
            self._rows = open_append(self.history)
        writer = csv.DictWriter(self._rows, fieldnames=list(row), extrasaction="ignore")
        with writing(self.history, 256):
            if self._rows.tell() == 0:
                writer.writeheader()
            writer.writerow(row)

    def close(self) -> None:
        self._jsonl.close()
        if self._rows is not None:
            self._rows.close()


class NullFiles(RunFiles):
    def __init__(self) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def event(self, event: str, **fields: Any) -> None:
        pass

    def history_row(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker:
    """Null experiment tracker: what every rank but 0 has, and rank 0 without --wandb."""

    run_id: str | None = None

    def log(self, values: dict[str, Any], step: int) -> None:
        pass

    def finish(self, exit_code: int) -> None:
        pass


def make_tracker(project: str, name: str, run_dir: Path, config: dict[str, Any], run_id: str | None) -> Tracker:
    """wandb on rank 0. A tracker never stops training: without an API key it logs offline, and if
    wandb fails to start at all the run goes on untracked; each case says so in one warning line."""
    import os

    mode: WandbMode | None = None
    if not os.environ.get("WANDB_MODE") and not _wandb_key():
        log.warning("wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline to %s/wandb; "
                    "upload later with `wandb sync`", run_dir)
        mode = "offline"
    for attempt in dict.fromkeys((mode, "offline")):
        try:
            return WandbTracker(project, name, run_dir, config, run_id, attempt)
        except Exception as e:  # wandb raises many kinds; none may end the run
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if attempt == "offline":
                log.warning("wandb: could not start even offline (%s): this run is not tracked", reason)
                return Tracker()
            log.warning("wandb: could not start (%s): logging offline to %s/wandb instead", reason, run_dir)
    return Tracker()


def _wandb_key() -> bool:
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbTracker(Tracker):
    def __init__(self, project: str, name: str, run_dir: Path, config: dict[str, Any], run_id: str | None,
                 mode: WandbMode | None = None):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                               dir=str(run_dir), config=config)
        self.run_id = self._run.id

    def log(self, values: dict[str, Any], step: int) -> None:
        self._run.log(values, step=step)

    def finish(self, exit_code: int) -> None:
        self._run.finish(exit_code=exit_code)


class Reporter:
    """Everything the loop reports, to every sink: console/progress, run files, tracker."""

    def __init__(self, files: RunFiles, tracker: Tracker, progress: Progress):
        self.files, self.tracker, self.progress = files, tracker, progress
        self._task_values: list[tuple[int, str, Any]] = []

    def start_epoch(self, epoch: int, epochs: int | None, total: int, done: int) -> None:
        self.progress.start_epoch(epoch, epochs, total, done)

    def advance(self) -> None:
        self.progress.advance()

    def event(self, name: str, **fields: Any) -> None:
        self.files.event(name, **fields)

    def train(self, step: int, epoch: int, total: int, epochs: int | None, samples: int, loss: float, lr: float,
              rate: float, memory: dict[str, float] | None = None) -> None:
        """`memory`: this rank's CUDA peaks (gpumem.peaks), shown and recorded on GPU runs."""
        self._write_task_values()
        memory = memory or {}
        self.files.event("train", step=step, epoch=epoch, samples=samples, loss=loss, lr=lr, **memory)
        self.tracker.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate,
                          **{f"train/{k}": v for k, v in memory.items()}}, step)
        mem = (f" mem {memory['max_mem_allocated_gib']:.1f}/{memory['max_mem_reserved_gib']:.1f} GiB"
               if memory else "")
        self.progress.show(f"{epoch_label(epoch, epochs)} step {step}/{total} loss {loss:.4f} lr {lr:.3g} "
                           f"{rate:.0f} samples/s{mem}")

    def task_logged(self, step: int, values: list[tuple[str, Any]]) -> None:
        """What the Task logged (Task.log) at `step`: kept until the next train line or the end."""
        self._task_values.extend((step, name, value) for name, value in values)

    def _write_task_values(self) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for step, name, value in self._task_values:
            by_step.setdefault(step, {})[name] = float(value)  # a tensor is read here, not at each step
        self._task_values = []
        for step, row in by_step.items():
            self.files.event("task", step=step, **row)
            self.tracker.log({f"task/{name}": value for name, value in row.items()}, step)

    def evaluation(self, row: dict[str, Any], epochs: int | None) -> None:
        self.files.history_row(row)
        self.files.event("eval", **row)
        self.tracker.log({f"val/{k[4:]}" if k.startswith("val_") else k: v for k, v in row.items()}, row["step"])
        log.info("%s %s", epoch_label(row["epoch"], epochs), fmt({k: v for k, v in row.items() if k != "epoch"}))

    def close(self, step: int, exit_code: int) -> None:
        self.progress.close()
        self._write_task_values()
        self.files.event("end", step=step, exit_code=exit_code)
        self.files.close()
        self.tracker.finish(exit_code)
