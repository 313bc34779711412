"""The training loop: steps, accumulation, AMP, clipping, logging, evaluation, early stopping,
checkpoints and the preemption check. Every decision is made identically on every rank."""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, checkpoint
from .config import FitConfig
from .dist import Comm
from .distenv import DistEnv
from .errors import TrainingError
from .evaluation import Evaluator, autocast
from .log import Progress, RunFiles, Tracker, fmt
from .metrics import loss_fn
from .preempt import PreemptFlag

log = logging.getLogger("ddp_train")


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best: float | None = None
    bad_evals: int = 0
    loss_sum: float = 0.0  # this epoch's synced training loss so far: [sum, count]
    loss_count: float = 0.0


@dataclass
class Run:
    cfg: FitConfig
    env: DistEnv
    comm: Comm
    model: torch.nn.Module  # the bare module: state dicts and evaluation
    wrapped: torch.nn.Module  # what trains: DDP / DataParallel / compiled
    ddp: Any  # the DDP module when there is one, for no_sync()
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loader: Any
    sampler: Any
    evaluator: Evaluator
    task: str
    device: torch.device
    ckpt_dir: Path
    total_steps: int
    files: RunFiles
    tracker: Tracker
    progress: Progress
    preempt: PreemptFlag
    resolved: dict[str, Any]
    state: TrainState = field(default_factory=TrainState)


def plan(cfg: FitConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps of the run)."""
    per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total = cfg.epochs * per_epoch
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def fit(run: Run) -> str:
    """Train until done; returns 'done', 'early_stop' or 'preempted'."""
    cfg, st, comm = run.cfg, run.state, run.comm
    batches = math.ceil(run.sampler.num_samples / cfg.batch_size)
    per_epoch, total = plan(cfg, batches)
    lossf = loss_fn(run.task)
    # Losses since the last sync, summed only then: per step this is a list append, no tensor op.
    window: list[tuple[torch.Tensor, int]] = []
    params = [p for p in run.model.parameters() if p.requires_grad]
    first_step = True
    seen = st.step * cfg.batch_size * cfg.grad_accum * run.env.world_size
    t0, t_log, seen_log = time.perf_counter(), time.perf_counter(), seen

    def sync_loss() -> float:
        sums = torch.zeros(2, dtype=torch.float64, device=run.device)
        if window:
            losses = torch.stack([loss for loss, _ in window]).double()
            counts = torch.tensor([n for _, n in window], dtype=torch.float64, device=run.device)
            if cfg.skip_nonfinite:  # those steps were skipped: leave them out of the mean too
                counts = torch.where(torch.isfinite(losses), counts, 0.0)
                losses = torch.nan_to_num(losses, nan=0.0, posinf=0.0, neginf=0.0)
            sums[0], sums[1] = (losses * counts).sum(), counts.sum()
        window.clear()
        comm.all_reduce_sum(sums)
        total_loss, count = sums.tolist()
        if not math.isfinite(total_loss):
            raise TrainingError(f"the training loss became {total_loss} by step {st.step} (epoch {st.epoch + 1}); "
                                f"the last good checkpoint is kept in {run.ckpt_dir}. Lower --lr, add "
                                "--clip-grad-norm, or pass --skip-nonfinite")
        st.loss_sum += total_loss
        st.loss_count += count
        return total_loss / max(count, 1)

    while st.step < total and st.epoch < cfg.epochs:
        run.sampler.set_epoch(st.epoch, start=st.batch_in_epoch * cfg.batch_size)
        run.wrapped.train()
        run.progress.start_epoch(st.epoch + 1, cfg.epochs, per_epoch, st.batch_in_epoch // cfg.grad_accum)
        batches_iter = iter(run.loader)
        while st.batch_in_epoch < batches and st.step < total:
            group = min(cfg.grad_accum, batches - st.batch_in_epoch)
            for i in range(group):
                x, y = next(batches_iter)
                x = x.to(run.device, non_blocking=True)
                y = y.to(run.device, non_blocking=True)
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                last_micro = i == group - 1
                no_sync = run.ddp.no_sync() if run.ddp is not None and not last_micro else contextlib.nullcontext()
                with no_sync:
                    with autocast(run.device, cfg.precision):
                        out = run.wrapped(x)
                    loss = lossf(out.float(), y if run.task == "classification" else y.view_as(out))
                    scaled = loss / group
                    (run.scaler.scale(scaled) if run.scaler else scaled).backward()
                window.append((loss.detach(), len(y)))
            seen += group * len(y) * run.env.world_size
            _optimizer_step(run, params)
            st.step += 1
            st.batch_in_epoch += group
            run.progress.advance()
            if first_step:
                run.files.event("first_step", step=st.step)
                first_step = False
            if st.step % cfg.log_every == 0:
                loss_now = sync_loss()
                now = time.perf_counter()
                lr = run.optimizer.param_groups[0]["lr"]
                rate = (seen - seen_log) / max(now - t_log, 1e-9)
                run.files.event("train", step=st.step, epoch=st.epoch + 1, samples=seen, loss=loss_now, lr=lr)
                run.tracker.log({"train/loss": loss_now, "train/lr": lr, "train/samples_per_s": rate}, st.step)
                run.progress.show(f"epoch {st.epoch + 1}/{cfg.epochs} step {st.step}/{total} "
                                  f"loss {loss_now:.4f} lr {lr:.3g} {rate:.0f} samples/s")
                t_log, seen_log = now, seen
            if comm.vote_any(run.preempt.requested is not None):
                comm.end_votes()
                sync_loss()
                path = save(run)
                log.info("preempted: checkpoint %s at step %d; exiting with code 3", path, st.step)
                _requeue(run)
                return "preempted"
            if cfg.save_every and st.step % cfg.save_every == 0:
                sync_loss()
                save(run, step_file=True)
        comm.end_votes()
        if st.batch_in_epoch >= batches:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        sync_loss()
        train_loss = st.loss_sum / max(st.loss_count, 1)
        if st.batch_in_epoch == 0:
            st.loss_sum = st.loss_count = 0.0
        results = run.evaluator(run.model)
        improved, stop = _early_stopping(run, results, train_loss)
        row = {"epoch": st.epoch if st.batch_in_epoch == 0 else st.epoch + 1, "step": st.step,
               "train_loss": train_loss, **results, "lr": run.optimizer.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 3)}
        run.files.history_row(row)
        run.files.event("eval", **row)
        run.tracker.log({f"val/{k[4:]}" if k.startswith("val_") else k: v for k, v in row.items()}, st.step)
        log.info("epoch %d/%d %s", row["epoch"], cfg.epochs, fmt({k: v for k, v in row.items() if k != "epoch"}))
        save(run, best=improved, step_file=bool(cfg.save_every and st.step % cfg.save_every == 0))
        if stop:
            log.info("early stopping: %s did not improve for %d evaluations", cfg.monitor, cfg.patience)
            return "early_stop"
    return "done"


def _optimizer_step(run: Run, params: list[torch.Tensor]) -> None:
    cfg = run.cfg
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    norm = None
    if cfg.clip_grad_norm or cfg.skip_nonfinite:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm or math.inf)
    # Gradients are already all-reduced, so this check (a host sync, opted into) agrees on every rank.
    if cfg.skip_nonfinite and not run.scaler and not torch.isfinite(norm).item():
        log.warning("step %d: non-finite gradients, step skipped", run.state.step + 1)
    elif run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.scheduler is not None:
        run.scheduler.step()


def _early_stopping(run: Run, results: dict[str, float], train_loss: float) -> tuple[bool, bool]:
    cfg, st = run.cfg, run.state
    value = {"train_loss": train_loss, **results}[cfg.monitor]
    better = st.best is None or (value < st.best if cfg.monitor_mode() == "min" else value > st.best)
    if better:
        st.best, st.bad_evals = value, 0
    else:
        st.bad_evals += 1
    return better, bool(cfg.patience and st.bad_evals >= cfg.patience)


def checkpoint_dict(run: Run, rngs: list[Any]) -> dict[str, Any]:
    st = run.state
    return {
        "version": checkpoint.FORMAT_VERSION,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "epoch": st.epoch, "step": st.step, "batch_in_epoch": st.batch_in_epoch,
        "rng": rngs,
        "best": st.best,
        "early_stopping": {"monitor": run.cfg.monitor, "mode": run.cfg.monitor_mode(),
                           "bad_evals": st.bad_evals, "patience": run.cfg.patience},
        "train_loss": [st.loss_sum, st.loss_count],
        "config": run.resolved,
        "world_size": run.env.world_size,
        "total_steps": run.total_steps,
        "wandb_run_id": run.tracker.run_id,
        "versions": {"ddp_train": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
    }


def save(run: Run, *, best: bool = False, step_file: bool = False) -> Path:
    """Collective: every rank's RNG state goes to rank 0, which writes; all wait until it is durable."""
    rngs = run.comm.gather_object(checkpoint.rng_state())
    path = run.ckpt_dir / "last.pt"
    if run.env.is_main:
        checkpoint.write(checkpoint_dict(run, rngs), run.ckpt_dir, best=best, step_file=step_file,
                         keep=run.cfg.keep)
    run.comm.barrier()
    return path


def restore(run: Run, ckpt: dict[str, Any]) -> None:
    """Everything but the model weights (loaded before wrapping) and the RNG (restored last)."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None and ckpt.get("scheduler") is not None:
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    loss_sum, loss_count = ckpt.get("train_loss", [0.0, 0.0])
    run.state = TrainState(epoch=ckpt["epoch"], step=ckpt["step"], batch_in_epoch=ckpt["batch_in_epoch"],
                           best=ckpt.get("best"), bad_evals=ckpt.get("early_stopping", {}).get("bad_evals", 0),
                           loss_sum=loss_sum, loss_count=loss_count)


def _requeue(run: Run) -> None:
    job = run.env.slurm_job_id
    if not (run.cfg.requeue and job and run.env.is_main):
        return
    log.info("requeueing Slurm job %s", job)  # before: the requeue may end this job at once
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        log.warning("--requeue: scontrol not found; requeue job %s by hand", job)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log.warning("--requeue: scontrol requeue %s failed: %s", job,
                    (getattr(e, "stderr", b"") or b"").decode().strip() or e)
