"""Errors and exit codes that the command line turns into one clear line."""

from typing import Any

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
# Preempted (SIGTERM or --preempt-signal): a checkpoint is durable; the same command resumes.
EXIT_PREEMPTED = 3
# Interrupted (Ctrl-C, SIGINT): a checkpoint is durable; the same command resumes. 128 + SIGINT, as shells say.
EXIT_INTERRUPTED = 130


class AgreedError(Exception):
    """Raised identically on every rank (from synced values or a broadcast): rank 0 alone reports it."""

    exit_code = EXIT_CRASH
    reported = False  # already printed by rank 0


class UsageError(AgreedError):
    """Bad input from the user: one line on rank 0, exit code 2, no traceback."""

    exit_code = EXIT_USAGE


class TrainingError(AgreedError):
    """Training cannot go on (e.g. a non-finite loss): one line on rank 0, exit code 1."""


class RankError(Exception):
    """An error of this rank alone (another rank may be fine, e.g. an out-of-memory on one GPU):
    the rank that raises it prints it, naming itself; the others stop as their peer failed."""

    def __init__(self, message: str, exit_code: int = EXIT_CRASH, details: str = ""):
        super().__init__(message)
        self.exit_code, self.details = exit_code, details


class PeerFailure(Exception):
    """Another rank failed or vanished; its own error says why."""

# What a collective raises when another rank died under it.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


class Stopped(SystemExit):
    """`fit()` stopped on a signal once its checkpoint was durable; the same call continues the run.

    A SystemExit, so a script that does not catch it exits with the CLI's code and no traceback;
    catch `ddp_train.Stopped` to do something first. `result` is the FitResult (its `status`,
    `step`, `checkpoint`); `exit_code` is 3 for `Preempted`, 130 for `Interrupted`."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, result: Any):  # a FitResult (result.py imports this module)
        super().__init__(self.exit_code)
        self.result = result


class Preempted(Stopped):
    """SIGTERM (a scheduler's or torchrun's stop) or --preempt-signal: exit code 3."""

    exit_code = EXIT_PREEMPTED


class Interrupted(Stopped):
    """Ctrl-C (SIGINT): exit code 130."""

    exit_code = EXIT_INTERRUPTED


def pickle_refusal(path: object, what: str) -> UsageError:
    """The one refusal for a file whose pickled parts name code (see docs/security.md)."""
    return UsageError(f"{path} holds pickled Python objects ({what}), which ddp_train's weights_only loading "
                      "refuses because unpickling can run arbitrary code; use a checkpoint written by ddp_train, or "
                      "re-save plain tensors: torch.save(model.state_dict(), path)")


class WriteFailure(RankError):
    """A write failed (disk full, quota, I/O error, a read-only file system): one line on the rank
    that saw it (the others stop through the watchdog), exit code 1. Its temp files are removed and
    the previous checkpoint is untouched; `last_checkpoint` names that checkpoint once known."""

    def __init__(self, what: str, path: object, error: OSError, needed: int | None, free: int | None):
        super().__init__(what)
        self.what, self.path, self.error, self.needed, self.free = what, path, error, needed, free
        self.last_checkpoint: str | None = None

    def __str__(self) -> str:
        reason = self.error.strerror or str(self.error) or type(self.error).__name__
        space = [f"needs {_size(self.needed)}" if self.needed is not None else "",
                 f"{_size(self.free)} free there" if self.free is not None else ""]
        figures = ", ".join(s for s in space if s)
        last = f"; {self.last_checkpoint}" if self.last_checkpoint else ""
        return (f"{self.what} {self.path} failed: {reason}{f' ({figures})' if figures else ''}{last}; free space "
                "(or fix the file system) and run the same command again to continue from it")


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
