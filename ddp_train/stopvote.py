"""The per-step stop vote: "does any rank want to stop?", answered identically on every rank.

Two ways to carry it, chosen per step, the same way on every rank:

- **inside DDP's gradient all-reduce** (after `attach(ddp)`, CPU models): a comm hook appends one
  element, this rank's flag, to the first gradient bucket of each synchronising backward, so asking
  costs no collective of its own: one extra element, and one copy of DDP's small first bucket;
- **on the control group** otherwise (no DDP, a CUDA model, or a step whose backward did not
  synchronise): one asynchronous one-element all-reduce, started now and read at the next vote.

On 2 CPU processes, digits-sized steps (~2 ms), the control vote costs 0.6-1.0 ms a step and the
hook 0-0.2 ms (benchmarks/README.md). Either way a flag passed to `vote` at step s is decided, on
every rank, at step s+1: the hook carries it in step s+1's backward, whose all-reduce has finished
when backward returns; the control vote started at step s is read at step s+1. Whether a step's
backward ran the hook is the same on every rank (the gradient all-reduce is a collective), so every
rank takes the same path and makes the same decision at the same step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class StopVote:
    def __init__(self, group: Any):
        self.group = group  # the control group (CPU, gloo)
        self._flag = False  # this rank's flags since the last send, sent by the next vote or hook
        self._async: tuple[Any, torch.Tensor] | None = None  # control-group vote in flight
        self._ended = False  # the result of the control vote that end() waited for
        self._carried: list[torch.Tensor] = []  # the hook's reduced flags since the last vote
        self._grad_group: Any = None

    def attach(self, ddp: torch.nn.parallel.DistributedDataParallel) -> bool:
        """Carry the vote in `ddp`'s gradient all-reduce; call on every rank before the first step.
        The hook computes the same mean as DDP's own all-reduce, bit for bit. Only for CPU models
        (returns False otherwise and changes nothing): on a GPU the hook's flag would live on the
        device, and reading it would wait for the GPU, while the control vote never does."""
        if any(p.is_cuda for p in ddp.parameters()):
            return False
        self._grad_group = ddp.process_group
        ddp.register_comm_hook(state=None, hook=self._hook)
        return True

    def vote(self, flag: bool) -> bool:
        """Record this rank's `flag`; True on every rank iff some rank's flag of the previous vote
        (or an earlier one) was True."""
        self._flag = self._flag or flag
        decision = self._finish_async()
        if self._carried:  # this step's backward carried the previous flags
            decision = any(bool(t.item() > 0) for t in self._carried) or decision
            self._carried.clear()
        else:  # no gradient all-reduce carried them: a vote of its own
            t = torch.tensor([int(self._flag)], dtype=torch.int32)
            self._async = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
            self._flag = False
        return decision

    def end(self) -> None:
        """Wait for the control vote in flight, so that no collective outlives the loop (its result
        counts at the next vote)."""
        self._ended = self._finish_async()

    def _finish_async(self) -> bool:
        ended, self._ended = self._ended, False
        if self._async is None:
            return ended
        work, t = self._async
        work.wait()
        self._async = None
        return bool(t.item()) or ended

    def _hook(self, state, bucket):  # no annotations: DDP rejects string ones (PEP 563)
        # (state: unused, bucket: dist.GradBucket) -> Future[Tensor]: the bucket's mean over ranks,
        # divided first, then summed, as DDP's default all-reduce does.
        grads = bucket.buffer()
        grads.div_(self._grad_group.size())
        if bucket.index() != 0:
            return (dist.all_reduce(grads, group=self._grad_group, async_op=True).get_future()
                    .then(lambda fut: fut.value()[0]))
        # This rank's flag rides at the end of bucket 0, DDP's small first bucket (~1 MB: the copy
        # that makes room for it is cheap); the sum counts the ranks that ask.
        packed = torch.cat([grads, torch.full((1,), float(self._flag), dtype=grads.dtype)])
        self._flag = False

        def unpack(fut: torch.futures.Future) -> torch.Tensor:
            reduced = fut.value()[0]
            grads.copy_(reduced[:-1])
            self._carried.append(reduced[-1:].clone())
            return grads

        return dist.all_reduce(packed, group=self._grad_group, async_op=True).get_future().then(unpack)
