"""The training loop, in three units: `Trainer.step` (one optimizer step over its micro-batches),
`LossWindow` (the synced training loss), and `train` (epochs, logging, evaluation, checkpoints,
preemption). Every decision is made identically on every rank, from synced values."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .batch import count, move_to, shapes
from .config import FitConfig
from .dist import Comm
from .errors import PEER_LOST, RankError, TrainingError
from .evaluation import Evaluator, autocast
from .gpumem import named_oom, peaks
from .checkpoint.saver import Checkpointer
from .log import Reporter
from .optim import Schedule
from .streaming import need_max_steps
from .policy import Policy
from .protocols import EpochSampler
from .task import LabelError, Task, drain_logged, overrides
from .userfn import data_error, first_step_hint, user_batches, user_error, where

log = logging.getLogger("ddp_train")


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    loss_sum: float = 0.0  # synced training loss since the last evaluation: sum and sample count
    loss_count: float = 0.0
    skipped: int = 0  # non-finite steps skipped in a row
    status: str = "running"  # running | done | early_stop


class Trainer:
    """Owns what changes the weights: the wrapped model, optimizer, scheduler and scaler."""

    def __init__(self, task: Task, model: torch.nn.Module, wrapped: torch.nn.Module, optimizer: Any,
                 schedule: Schedule | None, scaler: Any, cfg: FitConfig, device: torch.device, precision: str = "32",
                 sharded: bool = False, comm: Comm | None = None):
        self.task, self.model, self.wrapped = task, model, wrapped
        self.optimizer, self.scaler = optimizer, scaler
        self.scheduler = schedule.scheduler if schedule is not None else None
        self.per_epoch_schedule = schedule is not None and schedule.interval == "epoch"
        self.lr = optimizer.param_groups[0]["lr"]  # the learning rate of the last step taken
        self.device, self.precision, self.channels_last = device, precision, cfg.channels_last
        self.clip, self.skip_nonfinite = cfg.clip_grad_norm, cfg.skip_nonfinite
        self.inner = getattr(wrapped, "_orig_mod", wrapped)
        self.ddp = self.inner if isinstance(self.inner, torch.nn.parallel.DistributedDataParallel) else None
        self.sharded = sharded  # FSDP2: gradient sync and clipping through ddp_train.fsdp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = persistent_buffers(model)
        self.comm = comm
        self.units = overrides(task, "count")  # losses are means over the Task's own units (tokens)

    def step(self, micro_batches: list[Any]) -> tuple[list[tuple[torch.Tensor, Any]], bool]:
        """Forward, loss and backward for each micro-batch (gradients all-reduced on the last one
        only), then one optimizer step. Returns each micro-batch's (loss, units it averages: samples
        or `Task.count`) and whether the step was applied (False: skipped for non-finite gradients)."""
        losses: list[tuple[torch.Tensor, Any]] = []
        group = len(micro_batches)
        batches = [move_to(batch, self.device, self.channels_last) for batch in micro_batches]
        weights = self._unit_weights(batches) if self.units else None
        for i, batch in enumerate(batches):
            with self._sync(last=i == group - 1):
                with autocast(self.device, self.precision):
                    loss = self.task.loss(self.wrapped, batch)
                units: torch.Tensor | int
                if weights is not None:
                    units, weight = weights[0][i], weights[1][i]
                    scaled = loss * weight.to(loss.dtype)
                else:
                    units, scaled = count(batch), loss / group if group > 1 else loss  # no extra op per step
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append((loss.detach(), units))
        return losses, self._apply()

    def _unit_weights(self, batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(units, weight) per micro-batch: weight = units x world size / the step's units over all
        ranks (one all-reduce before the backwards), so that the gradient averaged over ranks is the
        mean over every unit of the step, as one batch of them all would give."""
        units = torch.stack([torch.as_tensor(self.task.count(b), dtype=torch.float64, device=self.device)
                             for b in batches])
        total = units.sum().reshape(1)
        world = 1
        if self.comm is not None:
            self.comm.all_reduce_sum(total)
            world = self.comm.env.world_size
        return units, units * world / total.clamp(min=1)

    def _sync(self, last: bool) -> Any:
        """Gradients are all-reduced (or reduce-scattered) on the last micro-batch only."""
        if self.sharded:
            from .fsdp import accumulating

            return accumulating(self.inner, last)
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def _apply(self) -> bool:
        self.lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler and (self.clip or self.skip_nonfinite):  # else scaler.step unscales inside the step
            self.scaler.unscale_(self.optimizer)
        applied = True
        if self.clip or self.skip_nonfinite:
            if self.sharded:
                from .fsdp import clip_grad_norm

                norm = clip_grad_norm(self.params, self.clip or math.inf)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip or math.inf)
            # Gradients are already all-reduced, so this check (a host sync, opted into) agrees on every rank.
            applied = bool(self.scaler) or not self.skip_nonfinite or bool(torch.isfinite(norm).item())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not self.per_epoch_schedule:
            self.scheduler.step()
        return applied

    def sync_buffers(self) -> None:
        """Collective: every rank takes rank 0's buffers (BatchNorm running statistics), so that
        evaluation, the best-checkpoint choice and the checkpoint see one model. Rank 0's, not the
        average: DDP itself broadcasts rank 0's buffers before every training forward
        (broadcast_buffers), so rank 0's are the ones training used, and a DDP checkpoint is rank 0's.
        FSDP does not sync buffers at all: this makes its ranks (and its checkpoint) agree too."""
        if self.buffers and dist.is_initialized() and dist.get_world_size() > 1:
            for same_dtype in _by_dtype(self.buffers):
                flat = torch.cat([b.reshape(-1) for b in same_dtype])
                dist.broadcast(flat, src=0)
                offset = 0
                for b in same_dtype:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def end_epoch(self) -> None:
        """A per-epoch schedule steps once each epoch has ended."""
        if self.scheduler is not None and self.per_epoch_schedule:
            self.scheduler.step()


def persistent_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a checkpoint saves (BatchNorm's running mean, variance and batch count)."""
    return [b for m in model.modules() for name, b in m.named_buffers(recurse=False)
            if name not in m._non_persistent_buffers_set]


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


class LossWindow:
    """Training losses since the last sync. Per micro-batch this is a list append (no tensor op);
    `sync` all-reduces them once and names the first step whose loss was not finite."""

    def __init__(self, comm: Comm, device: torch.device, skip_nonfinite: bool):
        self.comm, self.device, self.skip_nonfinite = comm, device, skip_nonfinite
        self.losses: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.steps: list[tuple[int, int]] = []  # (step, epoch) of each entry

    def add(self, losses: list[tuple[torch.Tensor, Any]], step: int, epoch: int) -> None:
        for loss, n in losses:
            self.losses.append(loss)
            self.counts.append(n)
            self.steps.append((step, epoch))

    def sync(self) -> tuple[float, float, tuple[int, int] | None]:
        """Collective: (sum of losses x samples, samples, (step, epoch) of the first non-finite loss)."""
        k = len(self.losses)
        vec = torch.zeros(2 * k + 1, dtype=torch.float64, device=self.device)
        if k:
            losses = torch.stack(self.losses).double()
            if all(isinstance(c, int) for c in self.counts):
                counts = torch.tensor(self.counts, dtype=torch.float64)
                counts = (counts.pin_memory() if self.device.type == "cuda" else counts).to(self.device, non_blocking=True)
            else:  # Task.count's tensors, on the device already
                counts = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=self.device) for c in self.counts])
            vec[:k], vec[k:2 * k] = torch.where(counts > 0, losses * counts, 0.0), counts
        self.comm.all_reduce_sum(vec)
        vec = vec.cpu()  # the one wait for the device per log line; what follows runs on the host
        steps, self.losses, self.counts, self.steps = self.steps, [], [], []
        weighted, counts = vec[:k], vec[k:2 * k]
        finite = torch.isfinite(weighted)
        bad = None if bool(finite.all()) else steps[int((~finite).nonzero()[0])]
        if self.skip_nonfinite:  # those steps were skipped: leave them out of the mean too
            counts = torch.where(finite, counts, 0.0)
            weighted = torch.where(finite, weighted, 0.0)
            bad = None
        return weighted.sum().item(), counts.sum().item(), bad


LABEL_HINT = "fix the labels, or give the model one output per class"


class SyncedLogs:
    """The Task's `synced_logs` values since the last sync: one all-reduce of [sum, count] per
    name, the same names on every rank (the Task's class lists them)."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names, self.device = tuple(names), device
        self.values: dict[str, list[Any]] = {name: [] for name in self.names}

    def add(self, logged: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Keeps the synced names' values; returns the others."""
        for name, value in logged:
            if name in self.values:
                self.values[name].append(value)
        return [(name, value) for name, value in logged if name not in self.values]

    def sync(self, comm: Comm) -> list[tuple[str, float]]:
        """Collective (when the Task lists names): each name's mean over every rank and step."""
        if not self.names:
            return []
        vec = torch.zeros(2 * len(self.names), dtype=torch.float64, device=self.device)
        for i, name in enumerate(self.names):
            if self.values[name]:
                vec[2 * i] = sum(torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                                 for v in self.values[name])
                vec[2 * i + 1] = len(self.values[name])
            self.values[name] = []
        sums = comm.all_reduce_sum(vec).tolist()
        return [(name, sums[2 * i] / sums[2 * i + 1]) for i, name in enumerate(self.names) if sums[2 * i + 1]]


@dataclass
class Loop:
    """What `train` works with; each part has one owner (assembled in train.run)."""
    cfg: FitConfig
    comm: Comm
    trainer: Trainer  # changes the weights
    loader: Any  # the training batches, and their sampler (epoch, start batch)
    sampler: EpochSampler
    evaluator: Evaluator
    policy: Policy  # when to evaluate and save, what is best, when to stop
    saver: Checkpointer  # collective saves, and where the newest checkpoint is
    report: Reporter  # console, run files, tracker
    preempt: Any  # .requested: the signal that asked to stop (SIGINT: Ctrl-C), if any
    origin: str  # the option that brought the user's code, for error messages
    state: TrainState


def plan(cfg: FitConfig, batches_per_epoch: int | None) -> tuple[int | None, int]:
    """(optimizer steps per epoch, total steps of the run); a stream (no length) has no steps per
    epoch, and runs --max-steps."""
    if batches_per_epoch is None:
        if not cfg.max_steps:
            raise need_max_steps()
        return None, cfg.max_steps
    per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total = cfg.epochs * per_epoch
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def train(run: Loop, on_preempt: Callable[[], None]) -> tuple[str, dict[str, float]]:
    """Train until done; returns ('done' | 'early_stop' | 'preempted' | 'interrupted', the last evaluation's row)."""
    cfg, st, comm, trainer = run.cfg, run.state, run.comm, run.trainer
    batches = run.sampler.num_batches
    per_epoch, total = plan(cfg, batches)
    epochs = cfg.epochs if per_epoch is not None and total == cfg.epochs * per_epoch else None  # None: steps decide
    window = LossWindow(comm, trainer.device, cfg.skip_nonfinite)
    own = SyncedLogs(trainer.task.synced_logs, trainer.device)
    world_size = comm.env.world_size
    seen = st.step * cfg.batch_size * cfg.grad_accum * world_size
    t0 = t_log = time.perf_counter()
    last_row: dict[str, Any] = {}
    seen_log, first_step = seen, True

    def sync_loss() -> None:
        total_loss, samples, bad = window.sync()
        if bad is not None or not math.isfinite(total_loss):
            step, epoch = bad or (st.step, st.epoch + 1)
            raise TrainingError(f"the training loss became {'nan' if bad else total_loss} at step {step} "
                                f"(epoch {epoch}); {run.saver.describe_last()}. Lower --lr, add --clip-grad-norm, or "
                                "pass --skip-nonfinite")
        st.loss_sum += total_loss
        st.loss_count += samples

    while st.step < total and st.epoch < cfg.epochs:
        run.sampler.set_epoch(st.epoch, st.batch_in_epoch)
        trainer.wrapped.train()
        run.report.start_epoch(st.epoch + 1, epochs, total, st.step)
        batches_iter = user_batches(run.loader, lambda e: batch_error(run.comm, run.origin, "training", e))
        epoch_ended = False
        while not epoch_ended and st.step < total:
            micro = _next_group(run, batches_iter, batches)
            if micro is None:  # a stream ran out on some rank: the epoch ends here, without a step
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                trainer.end_epoch()
                if run.policy.eval_due(st.step, True, st.epoch >= cfg.epochs):
                    sync_loss()
                    last_row, stop = _evaluate(run, t0, total, epochs)
                    if stop:
                        comm.end_votes()
                        return "early_stop", last_row
                break
            with named_oom(trainer.device, f"training step {st.step + 1}"):
                losses, applied = _first_step(run, micro) if first_step else _step(run, micro, st.step + 1)
            window.add(losses, st.step + 1, st.epoch + 1)
            seen += sum(count(b) for b in micro) * world_size
            st.step += 1
            comm.at_step(st.step)
            st.batch_in_epoch += len(micro)
            logged = own.add(drain_logged(trainer.task))
            if logged and comm.env.is_main:  # other ranks' values are dropped: no collective
                run.report.task_logged(st.step, logged)
            _count_skips(run, applied)
            run.report.advance()
            if first_step:
                run.report.event("first_step", step=st.step)
                first_step = False
            if st.step % cfg.log_every == 0:
                sync_loss()
                means = own.sync(comm)
                if means and comm.env.is_main:
                    run.report.task_logged(st.step, means)
                now = time.perf_counter()
                rate = (seen - seen_log) / max(now - t_log, 1e-9)
                run.report.train(st.step, st.epoch + 1, total, epochs, seen, _last_mean(st), trainer.lr, rate,
                                 peaks(trainer.device))
                t_log, seen_log = now, seen
            if comm.vote_any(run.preempt.requested is not None):
                comm.end_votes()
                # A preemption anywhere wins over Ctrl-C: its exit code (3) is what requeueing reads.
                interrupted = not comm.any(run.preempt.requested not in (None, "SIGINT"))
                sync_loss()
                trainer.sync_buffers()
                path = run.saver.save(step_file=run.policy.step_file_due(st.step), durable=True)
                if interrupted:
                    log.info("interrupted at step %d; saved %s; rerun the same command to continue", st.step, path)
                    return "interrupted", last_row
                log.info("preempted: checkpoint %s at step %d; exiting with code 3", path, st.step)
                on_preempt()
                return "preempted", last_row
            epoch_ended = batches is not None and st.batch_in_epoch >= batches
            if epoch_ended:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                trainer.end_epoch()
            # A vote may still be in flight on the control group: the collectives below queue
            # behind it in the same order on every rank, and its answer is read at the next vote.
            if run.policy.eval_due(st.step, epoch_ended, st.step >= total or st.epoch >= cfg.epochs):
                sync_loss()
                last_row, stop = _evaluate(run, t0, total, epochs)
                if stop:
                    comm.end_votes()
                    return "early_stop", last_row
            elif run.policy.step_file_due(st.step):
                sync_loss()
                trainer.sync_buffers()
                run.saver.save(step_file=True)
    comm.end_votes()
    return "done", last_row


def _next_group(run: Loop, batches_iter: Any, batches: int | None) -> list[Any] | None:
    """The next step's micro-batches. From a stream: None on every rank when any rank's share ran
    out (a step needs every rank; one small all-reduce per step)."""
    if batches is not None:
        return [next(batches_iter) for _ in range(min(run.cfg.grad_accum, batches - run.state.batch_in_epoch))]
    micro = list(itertools.islice(batches_iter, run.cfg.grad_accum))
    return None if run.comm.any(len(micro) < run.cfg.grad_accum) else micro


def _first_step(run: Loop, micro: list[Any]) -> tuple[list[tuple[torch.Tensor, int]], bool]:
    """The first step runs the user's model and loss on real data for the first time: a failure
    there is a mismatch between data and model, reported in one line naming what was loaded. When
    it failed on this rank only (a compile failure, a rank-specific bug), this rank reports it."""
    try:
        return run.trainer.step(micro)
    except torch.OutOfMemoryError:
        raise  # named by the caller, with the memory figures
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError, KeyError) as e:
        if run.comm.peer_failure() or any(s in str(e) for s in PEER_LOST):
            raise
        if isinstance(e, LabelError) or re.search(r"Target -?\d+ is out of bounds", str(e)):
            hint = LABEL_HINT
        else:
            hint = first_step_hint(e)
        at = where(e)
        error = user_error(e, run.origin, None, f"training on the first batch ({shapes(micro[0])})"
                           f"{f' at {at}' if at else ''}", hint)
        if not run.comm.all_failed("first_step"):
            raise RankError(str(error), error.exit_code, error.details) from e
        raise error from e


def _step(run: Loop, micro: list[Any], step: int) -> tuple[list[tuple[torch.Tensor, int]], bool]:
    """A later step: labels outside the model's outputs in this rank's batch are this rank's to report."""
    try:
        return run.trainer.step(micro)
    except LabelError as e:
        error = user_error(e, run.origin, None, f"training step {step}", LABEL_HINT)
        raise RankError(str(error), error.exit_code, error.details) from e


def batch_error(comm: Comm, origin: str, split: str, e: BaseException) -> BaseException:
    """A `split` batch could not be made: one line naming the user's frame; this rank's own when
    the other ranks' batches were fine."""
    error = data_error(e, origin.replace("--model/--data", "--data"),
                       f"making a {split} batch (the data set's __getitem__ or the Task's collate)")
    return error if comm.all_failed(f"{split}_batch") else RankError(str(error), error.exit_code, error.details)


def _count_skips(run: Loop, applied: bool) -> None:
    st = run.state
    if applied:
        st.skipped = 0
        return
    st.skipped += 1
    log.warning("step %d: non-finite gradients, step skipped (%d in a row)", st.step, st.skipped)
    if st.skipped >= run.cfg.max_skipped:
        raise TrainingError(f"{st.skipped} steps in a row had non-finite gradients (up to step {st.step}, epoch "
                            f"{st.epoch + 1}): training diverged; {run.saver.describe_last()}. Lower --lr or add "
                            "--clip-grad-norm (--max-skipped sets how many skips in a row are tolerated)")


def _last_mean(st: TrainState) -> float:
    return st.loss_sum / max(st.loss_count, 1)


def _evaluate(run: Loop, t0: float, total: int, epochs: int | None) -> tuple[dict[str, Any], bool]:
    """Evaluate, record, decide best and early stopping, checkpoint. Returns (row, stop)."""
    st, cfg = run.state, run.cfg
    train_loss = _last_mean(st)
    st.loss_sum = st.loss_count = 0.0
    run.trainer.sync_buffers()
    with named_oom(run.trainer.device, f"the evaluation at step {st.step}", evaluation=True):
        results = run.evaluator(run.trainer.model)
    if not math.isfinite(results["val_loss"]):
        raise TrainingError(f"the validation loss became {results['val_loss']} at step {st.step} (epoch "
                            f"{st.epoch}); {run.saver.describe_last()}. Lower --lr or add --clip-grad-norm")
    improved, stop = run.policy.observe({"train_loss": train_loss, **results}, st.step)
    done = st.step >= total or st.epoch >= cfg.epochs
    st.status = "early_stop" if stop else "done" if done else "running"
    epoch = st.epoch if st.batch_in_epoch == 0 else st.epoch + 1
    row = {"epoch": epoch, "step": st.step, "train_loss": train_loss, **results, "lr": run.trainer.lr,
           "seconds": round(time.perf_counter() - t0, 3)}
    run.report.evaluation(row, epochs)
    run.saver.save(best=improved, step_file=run.policy.step_file_due(st.step), durable=done or stop)
    if stop:
        log.info("early stopping: %s did not improve for %d evaluations", cfg.monitor, cfg.patience)
    return row, stop
