"""The stop vote: "does any rank want to stop?", answered identically on every rank, at the same step.

A vote is one asynchronous all-reduce on the control group (CPU, gloo) of [flag, -interval],
started at a voting step and read at the next one, so no rank waits while it travels. Not every
step votes: each rank proposes how many steps span about `every_s` seconds of its own training
(1 to `max_every`), and the all-reduce's MAX hands every rank the smallest proposal, read at the
same step from the same result, so the ranks keep voting at the same steps. A flag raised at any
step is decided on every rank within two intervals: about 2 x `every_s` of wall time, or two
steps where a step takes longer, and never more than 2 x `max_every` steps.

Why not every step: on 2 CPU processes a vote of its own costs ~1 ms on a ~2.4 ms digits step.
Why not inside DDP's gradient all-reduce (a Python comm hook, the previous design): the hook
replaces DDP's C++ all-reduce and costs 0.16-0.35 ms on that step (benchmarks/vote_cost.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class StopVote:
    def __init__(self, group: Any, every_s: float = 0.2, max_every: int = 64,
                 clock: Callable[[], float] = time.perf_counter):
        self.group = group  # the control group (CPU, gloo)
        self.every_s, self.max_every, self._clock = every_s, max_every, clock
        self._flag = False  # this rank's flags since the last send
        self._async: tuple[Any, torch.Tensor] | None = None  # the vote in flight
        self._decided = False  # a decision that end() read, returned by the next vote
        self._every = 1  # steps between votes: agreed, the same on every rank
        self._countdown = 1  # steps to the next vote
        self._steps = 0
        self._sent: tuple[float, int] | None = None  # (clock, steps) at this rank's last send

    def vote(self, flag: bool) -> bool:
        """Record this rank's `flag` (once per step); True on every rank at the same call once some
        rank's flag has been carried by a completed vote."""
        self._flag = self._flag or flag
        self._steps += 1
        self._countdown -= 1
        decided, self._decided = self._decided, False
        if self._countdown > 0:
            return decided
        decided = self._finish() or decided
        self._countdown = self._every
        t = torch.tensor([int(self._flag), -self._proposal()], dtype=torch.int64)
        self._async = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
        self._flag = False
        return decided

    def end(self) -> None:
        """Wait for the vote in flight, so that no collective outlives the loop (its decision is
        returned by the next `vote`)."""
        self._decided = self._finish() or self._decided

    def _proposal(self) -> int:
        """This rank's interval: the steps that its recent ones fit into `every_s` seconds."""
        now = self._clock()
        sent, self._sent = self._sent, (now, self._steps)
        if sent is None or now <= sent[0]:
            return 1
        step_s = (now - sent[0]) / (self._steps - sent[1])
        return max(1, min(self.max_every, int(self.every_s / step_s)))

    def _finish(self) -> bool:
        if self._async is None:
            return False
        work, t = self._async
        work.wait()
        self._async = None
        self._every = -int(t[1])
        return bool(t[0])
