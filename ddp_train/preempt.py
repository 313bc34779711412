"""Preemption: signal handlers only set a flag; the loop agrees on it at a step boundary."""

from __future__ import annotations

import os
import signal
from types import FrameType


class PreemptFlag:
    """SIGTERM (torchrun's and Slurm's stop signal) and an optional extra signal set `requested`.
    A second signal means "now": the process exits at once (the last checkpoint stays valid)."""

    def __init__(self, extra: str | None = None):
        self.requested: str | None = None
        self._signals = [signal.SIGTERM] + ([getattr(signal, f"SIG{extra}")] if extra else [])
        self._previous = {s: signal.signal(s, self._handle) for s in self._signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
