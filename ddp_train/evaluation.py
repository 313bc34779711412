"""Exact distributed evaluation: each sample counted once, the same figures for any world size.

Each rank evaluates its fixed global chunks (sampling.EvalChunks). Per chunk it records the loss
sum and the units it sums over (`Task.count`: samples, or valid tokens), the built-in statistics
and each torchmetrics metric's state; the loss, units and statistics travel in one all-reduce, the
metric states in one gather; everything is then summed in chunk order. Given a seed, each chunk's
forward runs under generators seeded from (seed, the chunk's first index): the same figures every time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch

from .batch import first_sample, move_to
from .dist import Comm
from .metrics import ChunkedMetric, cpu_states
from .sampling import EvalChunks
from .task import Task, overrides
from .transforms import EVAL_EPOCH, sample_hash, seeded_on


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Evaluator:
    def __init__(self, task: Task, loader: Iterable, chunks: EvalChunks, device: torch.device, comm: Comm,
                 precision: str = "32", channels_last: bool = False, lockstep: bool = False,
                 seed: int | None = None):
        self.task, self.loader, self.chunks, self.lockstep, self.seed = task, loader, chunks, lockstep, seed
        self.device, self.comm, self.precision, self.channels_last = device, comm, precision, channels_last
        self.metrics = [ChunkedMetric(name, m) for name, m in task.metrics().items()]
        for m in self.metrics:
            m.metric.to(device)
        make_stats = getattr(task, "statistics", None)
        self.stats_names = make_stats(1, device).names if make_stats else ()
        # A Task that overrides loss() gets val_loss from it (a second forward when metrics also
        # need outputs, unless its eval_step returns the loss too); otherwise from one eval_step.
        self.one_forward = not overrides(task, "loss")

    @property
    def names(self) -> list[str]:
        return ["val_loss"] + [f"val_{n}" for n in self.stats_names] + [f"val_{m.name}" for m in self.metrics]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, outputs: list | None = None) -> dict[str, float]:
        """Metrics over the whole split. With `outputs`, also collects (chunk id, model outputs)."""
        n_chunks = self.chunks.num_chunks
        make_stats = getattr(self.task, "statistics", None)
        stats = make_stats(n_chunks, self.device) if make_stats else None
        losses = torch.zeros(2 * n_chunks, dtype=torch.float64, device=self.device)  # loss sums, then units
        states: list[tuple[int, list[dict]]] = []
        need_outputs = stats is not None or bool(self.metrics) or outputs is not None
        was_training = model.training
        model.eval()
        batch = None
        try:
            for chunk_id, batch in zip(self.chunks.chunk_ids(), self.loader):
                batch = move_to(batch, self.device, self.channels_last)
                with self._seeded(chunk_id):
                    loss, out, target = self._forward(model, batch, need_outputs)
                units = torch.as_tensor(self.task.count(batch), dtype=torch.float64, device=self.device)
                losses[n_chunks + chunk_id] = units
                losses[chunk_id] = torch.where(units > 0, loss.double() * units, 0.0)  # no units: no loss (nor nan)
                if stats is not None:
                    stats.update(chunk_id, out.float(), target)
                if self.metrics:
                    states.append((chunk_id, [m.chunk_state(_float(out), target) for m in self.metrics]))
                if outputs is not None:
                    outputs.append((chunk_id, _float(out).cpu()))
            if self.lockstep:
                self._pad(model, need_outputs, batch)
        finally:
            model.train(was_training)
        synced = torch.cat([losses, stats.tensor]) if stats is not None else losses
        self.comm.all_reduce_sum(synced)
        total_units = synced[n_chunks:2 * n_chunks].sum().item()
        results = {"val_loss": synced[:n_chunks].sum().item() / total_units if total_units else math.nan}
        if stats is not None:
            stats.tensor = synced[2 * n_chunks:]
            results.update({f"val_{k}": v for k, v in stats.compute().items()})
        if self.metrics:
            results.update(self._metric_results(states))
        return results

    def _seeded(self, chunk_id: int) -> Any:
        """Random draws in the forward are a function of (seed, the chunk's first sample)."""
        if self.seed is None:
            return contextlib.nullcontext()
        return seeded_on(self.device, sample_hash(self.seed, EVAL_EPOCH, chunk_id * self.chunks.batch_size))

    def _forward(self, model: torch.nn.Module, batch: Any, need_outputs: bool) -> tuple[torch.Tensor, Any, Any]:
        out = target = None
        given: list[torch.Tensor]  # eval_step's optional third item: the batch's loss
        with autocast(self.device, self.precision):
            if self.one_forward or need_outputs:
                out, target, *given = self.task.eval_step(model, batch)
                if given:
                    return given[0], out, target
            if self.one_forward:
                loss = self.task.criterion(out, target)
            else:
                loss = self.task.loss(model, batch)
        return loss, out, target

    def _pad(self, model: torch.nn.Module, need_outputs: bool, last: Any) -> None:
        """Sharded models gather parameters in every forward, a collective: each rank runs as many
        forwards as the rank with the most chunks, the missing ones on a real batch whose results
        are discarded (this rank's last one, else the first sample): many models (Hugging Face's)
        reject an empty batch."""
        most = -(-self.chunks.num_chunks // self.chunks.world_size)
        missing = most - len(self.chunks.chunk_ids())
        if missing:
            filler = last if last is not None else move_to(first_sample(self.loader), self.device,
                                                           self.channels_last)
            for _ in range(missing):
                self._forward(model, filler, need_outputs)

    def _metric_results(self, states: list[tuple[int, list[dict]]]) -> dict[str, float]:
        """Rank 0 merges every chunk's metric states in chunk order and computes; all ranks get it."""
        gathered = self.comm.gather_object(cpu_states(states))

        def compute() -> dict[str, float]:
            assert gathered is not None  # compute runs on rank 0, which gathered
            ordered = sorted((pair for per_rank in gathered for pair in per_rank), key=lambda pair: pair[0])
            out = {}
            for i, m in enumerate(self.metrics):
                value = m.compute([chunk_states[i] for _, chunk_states in ordered])
                if isinstance(value, torch.Tensor):
                    out.update({f"val_{m.name}_{j}": v for j, v in enumerate(value.flatten().tolist())})
                else:
                    out[f"val_{m.name}"] = float(value)
            return out

        return self.comm.rank0(compute)


def _float(out: Any) -> Any:
    return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out
