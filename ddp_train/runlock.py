"""One run per run directory: a lock file that works where `flock` may not (NFS, Lustre).

Taking the lock is an atomic `link` of a complete file (host, pid, job id, start time) to
`RUN_DIR/.lock`: exactly one of two contenders succeeds, on a local disk or NFS alike, and a reader
never sees a half-written holder. While the run lives, a thread touches the file every
`HEARTBEAT_S` seconds. A lock is taken over only when its holder is provably gone: it was on this
host and its pid is dead, or its heartbeat is older than `STALE_S` seconds (twelve missed beats:
room for clock skew between hosts and a stalled file server). A holder from the same launch (a
requeued Slurm job, a torchrun restart) may still be exiting: it is waited for up to `WAIT_S`
seconds before the run is refused, long enough for a dead one's heartbeat to go stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import UsageError

LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 120.0
WAIT_S = STALE_S + 2 * HEARTBEAT_S


class RunLock:
    """Rank 0's hold on a run directory for the whole run. Not a collective."""

    def __init__(self, run_dir: Path, launch: str | None, slurm_job: str | None = None, *,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, wait_s: float = WAIT_S):
        """`launch`: the id that a requeue or restart of this launch keeps (DistEnv.run_id)."""
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s, self.wait_s = heartbeat_s, stale_s, wait_s
        self.me = {"program": "ddp-train", "host": socket.gethostname(), "pid": os.getpid(), "launch": launch,
                   "slurm_job": slurm_job, "since": time.time()}
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming its holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to run directory {self.run_dir} ({e.strerror}); pass a writable "
                             "--run-dir") from None
        deadline = time.monotonic() + self.wait_s
        while not self._try_link():
            holder = _read(self.path)
            if holder is None and not self.path.exists():
                continue  # released between our link and the read: try again
            if self._gone(holder or {}):
                self._take_over(holder)
                continue
            same_launch = self.me["launch"] and holder and holder.get("launch") == self.me["launch"]
            if not (same_launch and time.monotonic() < deadline):
                who = describe(holder) if holder else f"another run (its lock file {self.path} is unreadable)"
                raise UsageError(f"{self.run_dir} is in use by {who}; wait for it, or use another --run-dir")
            time.sleep(min(0.5, self.wait_s / 10))  # the same launch's previous attempt is still exiting
        self._beat = threading.Thread(target=self._heartbeat, name="ddp_train-runlock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Not a collective: stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(5)
        if self._ours():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _try_link(self) -> bool:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.me['host']}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # NFS may report a link it made as failed: the link count tells
            return tmp.stat().st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _gone(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.me["host"] and not _alive(holder.get("pid")):
            return True
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_s
        except FileNotFoundError:
            return False

    def _take_over(self, holder: dict[str, Any] | None) -> None:
        """Move the dead holder's file aside; if what moved is not that holder's (another run took
        the lock in between), put it back."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read(aside) != holder:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _ours(self) -> bool:
        return _read(self.path) == self.me

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours():
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """'ddp-train pid 4242 on node7 (Slurm job 123) since 14:02'."""
    job = f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    since = time.strftime("%H:%M", time.localtime(holder.get("since", 0)))
    return f"{holder.get('program', 'ddp-train')} pid {holder.get('pid')} on {holder.get('host')}{job} since {since}"
