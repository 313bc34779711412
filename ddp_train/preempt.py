"""Preemption and Ctrl-C: signal handlers only set a flag; the loop agrees on it at a step boundary."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType


class PreemptFlag:
    """SIGTERM (torchrun's and Slurm's stop signal), SIGINT (Ctrl-C, unless the process ignores it,
    as a background job does) and an optional extra signal set `requested`. A second signal means
    "now": the process exits at once; the newest complete checkpoint stays (writes are atomic)."""

    def __init__(self, extra: str | None = None, announce: bool = True):
        self.requested: str | None = None
        self._announce = announce
        signals = [signal.SIGTERM] + ([getattr(signal, f"SIG{extra}")] if extra else [])
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signals.append(signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if self._announce:
                with contextlib.suppress(Exception):
                    print(f"{signal.Signals(signum).name} again: exiting now; the newest complete checkpoint is "
                          "kept", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
