"""The failure watchdog: a thread on every rank that ends the job within bounded time when a rank
fails, hangs or loses its launcher, so that no rank waits out the collective --timeout.

Every `interval` seconds (at most a fifth of `hang_s`) each rank's thread writes its heartbeat to the job's store (a counter,
the rank's step, host and pid). Rank 0's thread reads every rank's; the others read rank 0's.
A rank whose heartbeat has not changed for `hang_s` seconds is stopped but alive (SIGSTOP, a
frozen node, a stuck driver call): a thread of a running process beats during the longest
evaluation or save, so the silence is the process's, not its work's. The verdict is written to
the store as the job's failure, naming the rank, its step and --timeout; a rank on the hung
rank's host kills it (SIGKILL: the only signal a stopped process obeys), which closes its
connections, so every healthy rank's blocked collective fails and its main thread raises
PeerFailure with the verdict; and the launcher's report names the hung rank, which exits first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from .distenv import DistEnv
from .errors import EXIT_CRASH

ABORT_KEY = "ddp_train/abort"
HUNG_KEY = "ddp_train/hung"


def beat_key(rank: int) -> str:
    return f"ddp_train/beat/{rank}"


class Watchdog(threading.Thread):
    """Not a collective. `step()` gives this rank's current step (read, never waited on)."""

    def __init__(self, store: Any, env: DistEnv, hang_s: float, timeout_s: float, interval: float = 1.0,
                 grace: float = 5.0):
        super().__init__(name="ddp_train-watchdog", daemon=True)
        self.store, self.env = store, env
        self.step: Callable[[], int] = lambda: 0
        # Beat several times per --hang-timeout: a late beat on a loaded machine is no hang.
        interval = min(interval, hang_s / 5) if hang_s else interval
        self.hang_s, self.timeout_s, self.interval, self.grace = hang_s, timeout_s, interval, grace
        self.stopped = threading.Event()
        self.me = f"{socket.gethostname()} {os.getpid()}"
        self.beats = 0
        self.peers = list(range(1, env.world_size)) if env.is_main else [0]
        self.heard: dict[int, tuple[bytes, float]] = {}  # rank -> (last heartbeat, when it changed)
        self.answered = time.monotonic()  # when the store last answered the poller
        self.reason: str | None = None  # the job's failure, once the poller has found one
        self.store_lost = False  # the poller lost the store (and waited `grace` already)
        # A launcher that runs us as its child (torchrun's agent, mpirun's daemon): when it dies we are
        # reparented, and must stop at once rather than train on and write checkpoints.
        self.parent = os.getppid() if env.launcher in ("torchrun", "mpi", "lsf") else None

    def beat(self) -> None:
        """Write this rank's heartbeat (also called once before the thread starts)."""
        self.beats += 1
        self.store.set(beat_key(self.env.rank), f"{self.beats} {self.step()} {self.me}")

    def stop(self, timeout: float = 2.0) -> None:
        """Not a collective. Returns once the thread has ended (it wakes at once from its wait;
        a store call in flight is given `timeout` seconds)."""
        self.stopped.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    def run(self) -> None:
        """Acts on what the poller finds; a poller stuck in a store call is itself a finding (the
        store's host, rank 0 or torchrun's agent, is stopped), so it runs in a thread of its own."""
        failed_at = None
        poller = threading.Thread(target=self._poll, name="ddp_train-heartbeat", daemon=True)
        poller.start()
        while not self.stopped.wait(min(0.2, self.interval)):
            if self.parent is not None and os.getppid() != self.parent:
                die(f"[rank {self.env.rank}] stopping: its launcher (pid {self.parent}) died")
            now = time.monotonic()
            reason = self.reason
            if reason is None and self.hang_s and now - self.answered > self.hang_s + self.interval:
                reason = self._store_silent(now - self.answered)
                failed_at = now - self.grace  # no store to tell the others through: end now
            if reason is None or self.stopped.is_set():
                continue
            failed_at = failed_at or (now - self.grace if self.store_lost else now)
            self._kill_hung_neighbour()
            # The main thread raises PeerFailure once its collective fails; where it cannot (a peer on
            # another host is stopped and holds the collective), the process ends here.
            if now - failed_at >= self.grace:
                die(f"[rank {self.env.rank}] stopping: {reason}")
        poller.join(2.0)

    def _poll(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
                self.reason = self._failure(time.monotonic())
                self.answered = time.monotonic()
            except Exception:
                if self.stopped.wait(self.grace):
                    return  # normal shutdown: rank 0 closed the store after the final barrier
                self.store_lost = True
                self.reason = "lost contact with the job's rendezvous store (another rank died)"
            if self.reason:
                return

    def _store_silent(self, silent_s: float) -> str:
        """The store has not answered for `silent_s` seconds: its host is stopped. Rank 0 (which
        serves it unless torchrun's agent does) is killed by a neighbour, as a hung rank is."""
        wait = f"(--hang-timeout {self.hang_s:g}); the job stopped rather than wait --timeout {self.timeout_s:g} s"
        if self.env.agent_store or 0 not in self.heard:
            return f"the job's store (torchrun's agent) has not answered for {silent_s:.0f} s {wait}"
        _, step, host, pid = self.heard[0][0].decode().split()
        with contextlib.suppress(OSError):
            if host == socket.gethostname():
                os.kill(int(pid), signal.SIGKILL)
        return (f"rank 0 (pid {pid} on {host}) stopped responding at step {max(int(step), self.step())}: the job's "
                f"store, which it serves, has not answered for {silent_s:.0f} s {wait}")

    def _failure(self, now: float) -> str | None:
        """The job's failure, announced or found now: a peer whose heartbeat stopped."""
        if self.store.check([ABORT_KEY]):
            return self.store.get(ABORT_KEY).decode()
        if not self.hang_s:
            return None
        keys = [beat_key(r) for r in self.peers]
        for rank, value in zip(self.peers, self.store.multi_get(keys)):
            last = self.heard.get(rank)
            if last is None or last[0] != value:
                self.heard[rank] = (value, now)
            elif now - last[1] > self.hang_s:
                return self._declare_hung(rank, value.decode(), now - last[1])
        return None

    def _declare_hung(self, rank: int, beat: str, silent_s: float) -> str:
        _, beat_step, host, pid = beat.split()
        step = max(int(beat_step), self.step())  # its last beat may predate its last step
        reason = (f"rank {rank} (pid {pid} on {host}) stopped responding at step {step}: no heartbeat for "
                  f"{silent_s:.0f} s (--hang-timeout {self.hang_s:g}); the job stopped rather than wait "
                  f"--timeout {self.timeout_s:g} s for it")
        self.store.set(HUNG_KEY, f"{host} {pid}")
        # The first verdict stands (rank 0 and another rank may both find one).
        return self.store.compare_set(ABORT_KEY, "", reason).decode()

    def _kill_hung_neighbour(self) -> None:
        with contextlib.suppress(Exception):
            if self.store.check([HUNG_KEY]):
                host, pid = self.store.get(HUNG_KEY).decode().split()
                if host == socket.gethostname() and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)


def die(message: str) -> None:
    """End this process now, with one line: for a thread that cannot raise into the main one."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_CRASH)
