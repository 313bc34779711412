"""One `fit`, assembled: config + task + environment -> data, model, checkpoints -> the loop.

Each part has one owner: `Trainer` (what changes the weights), the loaders and `Evaluator`,
`Policy` (evaluation, best, early stopping), `Checkpointer` (saves), `Reporter` (output).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, checkpoint, cpu_malloc, optim, runlock
from .config import RESUMABLE_CHANGES, FitConfig, dump_json, option_name, run_identity, task_identity
from .data import TensorData, check_sizes, default_workers, eval_loader, rank0_first, train_loader
from .dist import Comm
from .distenv import DistEnv
from .errors import UsageError, WriteFailure
from .evaluation import Evaluator
from .fingerprint import data_fingerprint, describe_change
from .log import NullFiles, NullProgress, Progress, Reporter, RunFiles, Tracker, log, make_tracker
from .loop import Loop, Trainer, TrainState, batch_error, plan, train
from .parallel import resolve_strategy, wrap
from .policy import Policy
from .result import FitResult
from .trackers import TensorBoardTracker, Trackers, check_tensorboard
from .task import BuiltinTask, Task, check_settings, spec_of
from .userfn import NamedErrors, user_code

OUR_FILES = ("config.json", "history.csv", "metrics.jsonl", "history.png")


def run(settings: FitConfig, task: Task, env: DistEnv, comm: Comm, preempt: Any) -> FitResult:
    """`settings` are the run's (saved, checked on resume); `cfg` is what this world size runs."""
    with contextlib.ExitStack() as held:  # rank 0: the run directory's lock, until the run ends
        return _run(settings, task, env, comm, preempt, held)


def _run(settings: FitConfig, task: Task, env: DistEnv, comm: Comm, preempt: Any,
         held: contextlib.ExitStack) -> FitResult:
    cfg = resolve_batches(settings, env.world_size)
    if cfg.tensorboard:
        check_tensorboard()
    device = torch.device(env.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cfg.precision == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
            log.warning("this GPU (%s) has no native bfloat16: --precision bf16 is emulated and slow; "
                        "--precision fp16 is its fast mixed precision", torch.cuda.get_device_name(device))
    else:
        cpu_malloc.keep_large_blocks()
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU (CPUs lack fast fp16 and GradScaler support); "
                         "use --precision bf16 or 32 on CPU")
    strategy = resolve_strategy(cfg.strategy, env, cfg.precision)
    sharded_run = settings.strategy == "fsdp"
    _seed(cfg.seed)
    origin = f"--task {cfg.task}" if cfg.task else "--model/--data"

    splits = rank0_first(lambda: _data(task, cfg), cfg.download, comm)
    check_sizes(splits, env.world_size)
    data_id = data_fingerprint(splits)
    if isinstance(task, BuiltinTask):
        cfg, settings = cfg.replace(model=task.model_name), settings.replace(model=task.model_name)
        if ":" in task.model_name:
            origin = f"--model {task.model_name}"

    if cfg.data_on_device:  # before the loaders, so that training reads the device copy too
        splits = {k: v.to(device) if isinstance(v, TensorData) else v for k, v in splits.items()}
    train_set = splits["train"]
    if cfg.workers is None:
        cfg = cfg.replace(workers=default_workers(cfg.data, device.type == "cuda", env.local_world_size))
    with user_code(origin.split("/")[0], cfg.task, "choosing its collate functions"):
        collates = {split: task.collate(split) for split in splits}
    loader, sampler = train_loader(train_set, cfg.batch_size, env.rank, env.world_size, cfg.seed, cfg.workers,
                                   device.type == "cuda", settings.global_batch_size, collates["train"])
    per_epoch, total = plan(cfg, sampler.num_batches)
    run_dir, ckpt_path = comm.rank0(prepare_run_dir, settings, env, held)
    ckpt = checkpoint.load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None:  # before any weights load: name the differing settings, not tensor shapes
        _check_compatible(ckpt, settings, env, ckpt_path, total)
        _check_data(ckpt, data_id, cfg, ckpt_path)
        _check_init_from(ckpt, cfg, ckpt_path)

    with user_code("--task" if cfg.task else "--model", cfg.task or cfg.model, "building the model"):
        # --pretrained: rank 0 downloads the weights into the shared cache, then the others read it
        model = rank0_first(lambda: task.model(cfg), cfg.pretrained, comm)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{origin.split('/')[0]} must build a torch.nn.Module, got {type(model).__name__}")
    if cfg.init_from and ckpt is None:
        _init_from(model, cfg.init_from, cfg.init_strict)
    if ckpt is not None and not sharded_run:
        checkpoint.load_weights(model, ckpt["model"], str(ckpt_path))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    blocks = task.blocks(model) if strategy == "fsdp" else None
    wrapped = wrap(model, strategy, env, cfg.compile, blocks, cfg.precision)
    with user_code("--task", cfg.task, "building its optimizer"):
        optimizer = optim.task_optimizer(task, cfg, model)
    optimizer_described = optim.describe_optimizer(optimizer)  # before a schedule or a load changes its lrs
    with user_code("--task", cfg.task, "building its schedule"):
        schedule = optim.task_scheduler(task, cfg, optimizer, optim.StepPlan(per_epoch, total))
    optimization = {"optimizer": optimizer_described, "scheduler": optim.describe_schedule(schedule)}
    if ckpt is not None:
        _check_same_optimization(ckpt, optimization, ckpt_path)
    if ckpt is not None and sharded_run:  # DCP reshards: any world size reads it
        from .checkpoint import sharded

        # After the schedule is built, as a plain checkpoint's optimizer state is (in _restore):
        # a schedule built on loaded rates would take them for its base rates.
        sharded.load(ckpt_path, model, optimizer)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    val_loader, chunks = eval_loader(splits["val"], eval_batch_size(cfg), env.rank, env.world_size, cfg.workers,
                                     device.type == "cuda", collates["val"], eval_seed(task, cfg))
    val_loader = NamedErrors(val_loader, lambda e: batch_error(comm, origin, "validation", e))
    with user_code(origin.split("/")[0], cfg.task, "building its metrics"):
        evaluator = Evaluator(task, val_loader, chunks, device, comm, _autocast(cfg, strategy), cfg.channels_last,
                              lockstep=strategy == "fsdp", seed=eval_seed(task, cfg))
    _check_monitor(cfg, evaluator.names)

    main = env.is_main
    extra = {"world_size": env.world_size, "launcher": env.launcher, "backend": env.backend,
             "device": env.device, "strategy": strategy, "run_dir": str(run_dir)}
    try:
        files = RunFiles(run_dir) if main else NullFiles()
        if main:
            dump_json(settings, extra, run_dir / "config.json", optimization=optimization)
    except WriteFailure as e:
        e.last_checkpoint = (f"the last complete checkpoint is {ckpt_path} (step {ckpt['step']})" if ckpt
                             else "no checkpoint was written before it")
        raise
    trackers: list[Tracker] = []
    if main and cfg.wandb:
        trackers.append(make_tracker(cfg.wandb_project, cfg.wandb_name or run_dir.name, run_dir,
                                     {**settings.to_dict(), **extra}, ckpt.get("wandb_run_id") if ckpt else None))
    if main and cfg.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard", ckpt.get("step") if ckpt else None))
    tracker = Trackers(trackers)
    report = Reporter(files, tracker, Progress(cfg.progress) if main else NullProgress())
    trainer = Trainer(task, model, wrapped, optimizer, schedule, scaler, cfg, device, _autocast(cfg, strategy),
                      sharded=strategy == "fsdp", comm=comm)
    policy, state = Policy(cfg), TrainState()

    config = settings.to_dict()  # the same for the whole run

    def state_dict(rngs: list[Any] | None, with_tensors: bool) -> dict[str, Any]:
        return {**_checkpoint_dict(trainer, state, policy, config, cfg, env, total, tracker, rngs, with_tensors),
                "optimization": optimization, "data": data_id}

    saver = checkpoint.Checkpointer(run_dir / "checkpoints", comm, cfg.keep, state_dict, lambda: state.step,
                                    (model, optimizer) if sharded_run else None, cfg.save_every_seconds)
    loop = Loop(cfg=cfg, comm=comm, trainer=trainer, loader=loader, sampler=sampler, evaluator=evaluator,
                policy=policy, saver=saver, report=report, preempt=preempt, origin=origin, state=state)
    log.info("ddp_train: launcher=%s world_size=%d backend=%s device=%s strategy=%s run_dir=%s",
             env.launcher, env.world_size, env.backend, env.device, strategy, run_dir)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    crowded = env.oversubscribed(cores)
    if crowded:
        log.warning(crowded)
    if ckpt is not None:
        _restore(trainer, state, policy, ckpt, per_rank_samples=cfg.batch_size * env.world_size,
                 optimizer_too=not sharded_run)
        saver.last = saver.complete = (Path(ckpt_path), state.step)
        try:
            files.truncate_after(state.step)
        except WriteFailure as e:
            e.last_checkpoint = saver.describe_complete()
            raise
        checkpoint.set_rng_state(ckpt["rng"][env.rank % len(ckpt["rng"])])  # another world size: by rank
        stopped = state.status == "early_stop" and cfg.patience and policy.bad_evals >= cfg.patience
        if not (stopped or state.step >= total or state.epoch >= cfg.epochs):
            log.info("resumed from %s: epoch %d, step %d (%d of the epoch's %s steps done)", ckpt_path,
                     state.epoch + 1, state.step, state.batch_in_epoch // cfg.grad_accum, per_epoch or "?")
        else:
            more = "--patience N" if stopped else "--epochs N (or --max-steps N)"
            log.info("nothing to do: the run in %s already %s (step %d of %d); to train it longer: --run-dir %s "
                     "%s; for a new run, change a setting or pass another --run-dir", run_dir,
                     "stopped early" if stopped else "finished", state.step, total, run_dir, more)
            report.close(state.step, 0)
            return _result("nothing_to_do", state, run_dir, {}, policy, saver)
    started = time.perf_counter()
    code = 1
    try:
        outcome, last_row = train(loop, lambda: _requeue(cfg, env))
        code = {"preempted": 3, "interrupted": 130}.get(outcome, 0)
    except WriteFailure as e:  # history.csv or metrics.jsonl (a checkpoint's names its own)
        e.last_checkpoint = e.last_checkpoint or saver.describe_complete()
        raise
    finally:
        try:
            saver.close()  # a failed run keeps its best evaluation too
        finally:
            report.close(state.step, code)
    if outcome not in ("preempted", "interrupted"):
        best = f"{policy.best:.4g}" if policy.best is not None else "n/a"
        log.info("done: %d steps in %.1fs; best %s %s; run dir %s", state.step, time.perf_counter() - started,
                 cfg.monitor, best, run_dir)
    return _result(outcome, state, run_dir, last_row, policy, saver)


def _result(status: str, state: TrainState, run_dir: Path, row: dict[str, Any], policy: Policy,
            saver: checkpoint.Checkpointer) -> FitResult:
    best = {policy.monitor: policy.best, "step": policy.best_step} if policy.best is not None else {}
    return FitResult(status=status, step=state.step, epoch=state.epoch, run_dir=str(run_dir), metrics=row,
                     best=best, checkpoint=str(saver.last[0]) if saver.last else None)


def _data(task: Task, cfg: FitConfig) -> dict[str, Any]:
    option = "--task" if cfg.task else "--data"
    with user_code(option, cfg.task or (cfg.data if ":" in cfg.data else None), "loading the data"):
        splits = task.data(cfg)
    if not isinstance(splits, dict) or not {"train", "val"} <= splits.keys():
        raise UsageError(f"{option} {cfg.task or cfg.data}: data(cfg) must return a dict with 'train' and 'val' "
                         f"data sets (and optionally 'test'); got {type(splits).__name__}")
    return splits


def resolve_batches(settings: FitConfig, world_size: int) -> FitConfig:
    """With --global-batch-size G: each rank takes G / world size, in the fewest equal micro-batches
    of at most --batch-size (gradient accumulation makes up the rest)."""
    g = settings.global_batch_size
    if g is None:
        return settings
    if g % world_size:
        raise UsageError(f"--global-batch-size {g} does not divide over {world_size} ranks; use a multiple of "
                         f"{world_size}, or another number of processes")
    per_rank = g // world_size
    accum = next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= settings.batch_size)
    return settings.replace(batch_size=per_rank // accum, grad_accum=accum)


def eval_batch_size(cfg: FitConfig) -> int:
    """--eval-batch-size, else the training micro-batch: evaluation holds no more activations (and
    logits: a 50k-token vocabulary's are most of the memory) than a training step."""
    return cfg.eval_batch_size or cfg.batch_size


def eval_seed(task: Task, cfg: FitConfig) -> int | None:
    """The seed of evaluation's random draws: the user's Task may draw (a masking collator); the
    built-in tasks draw nothing and skip the seeding's cost."""
    return None if isinstance(task, BuiltinTask) else cfg.seed


def _autocast(cfg: FitConfig, strategy: str) -> str:
    """FSDP's mixed-precision policy casts by itself: no autocast on top of it."""
    return "32" if strategy == "fsdp" else cfg.precision


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def _check_monitor(cfg: FitConfig, names: list[str]) -> None:
    names = ["train_loss"] + names
    if cfg.monitor not in names:
        raise UsageError(f"--monitor {cfg.monitor} is not a metric of this run; choose one of {', '.join(names)}")


def default_run_dir(cfg: FitConfig, world_size: int) -> Path:
    """runs/<data>-<model>-<hash of the run's identity>: the identical command (same settings, same
    number of processes) finds its own run again and continues it; any other command gets a
    directory of its own."""
    identity = json.dumps(run_identity(cfg, world_size), sort_keys=True, default=str)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    name = cfg.task.rpartition(":")[2] if cfg.task else f"{cfg.data}-{cfg.model}"
    return Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{digest}"


def prepare_run_dir(cfg: FitConfig, env: DistEnv, held: contextlib.ExitStack) -> tuple[Path, Path | None]:
    """Rank 0: choose and create the run directory, lock it until `held` closes (before anything in
    it is touched: another run may be using it), and pick the checkpoint to resume, if any."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, env.world_size)
    lock = runlock.RunLock(run_dir, env.run_id, env.slurm_job_id)
    lock.acquire()
    held.callback(lock.release)
    ckpt_dir = run_dir / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to run directory {run_dir} ({e.strerror}); pass a writable "
                         "--run-dir") from None
    checkpoint.clean_temp_files(ckpt_dir)
    resume = cfg.resume
    if env.restart_count > 0:  # a restart or requeue of this very launch continues its own run
        latest = checkpoint.latest(ckpt_dir, cfg.strategy == "fsdp")
        if latest is not None:
            return run_dir, latest
        cfg = cfg.replace(overwrite=True)  # nothing was saved yet: the partial files may go
    if resume not in ("auto", "never"):
        return run_dir, Path(resume)
    sharded_run = cfg.strategy == "fsdp"
    existing = [run_dir / f for f in OUR_FILES if (run_dir / f).exists()]
    if resume == "never":
        if (existing or any(ckpt_dir.iterdir())) and not cfg.overwrite:
            raise UsageError(f"{run_dir} already holds a run; pass --overwrite to replace it, --resume auto "
                             "to continue it, or another --run-dir")
        for path in existing:
            path.unlink(missing_ok=True)
        checkpoint.remove_all(ckpt_dir)
        return run_dir, None
    latest = checkpoint.latest(ckpt_dir, sharded_run)
    if latest is None:
        _check_other_strategy(run_dir, cfg.strategy)
    return run_dir, latest


def _check_other_strategy(run_dir: Path, strategy: str) -> None:
    """Checkpoints of the other kind (sharded FSDP vs plain) would otherwise go unseen: the run would
    start over at step 0 and mix two runs in its history. No switch is a supported reshard (the
    optimizer state's layout differs); an FSDP run resumes on any number of processes (DCP reshards)."""
    sharded_run = strategy == "fsdp"
    try:
        other = checkpoint.latest(run_dir / "checkpoints", not sharded_run)
    except UsageError:
        return  # none of them readable: nothing to continue
    if other is None:
        return
    kind, fix = (("plain", "the --strategy it ran with (auto, ddp, dp or single)") if sharded_run
                 else ("sharded (--strategy fsdp)", "--strategy fsdp"))
    raise UsageError(f"{run_dir} holds {kind} checkpoints ({other}) that --strategy {strategy} cannot resume: "
                     f"pass {fix} to continue that run, or another --run-dir (`ddp-train export` makes a "
                     "state dict of its weights for --init-from)")


def _check_init_from(ckpt: dict[str, Any], cfg: FitConfig, path: Path) -> None:
    """--init-from starts a run; a resumed run keeps its own weights. The same command again (a
    requeue) names the run's own --init-from, which was applied at its start."""
    if cfg.init_from and ckpt.get("config", {}).get("init_from") != cfg.init_from:
        raise UsageError(f"--init-from {cfg.init_from} would be ignored: {path} (step {ckpt.get('step')}) continues "
                         "this run with its own weights; drop --init-from to continue it, or pass another --run-dir "
                         "to start a new run from those weights")


def _check_data(ckpt: dict[str, Any], data_id: dict[str, Any], cfg: FitConfig, path: Path) -> None:
    changed = describe_change(ckpt.get("data") or {}, data_id)
    if changed:
        where = f"--data-dir {cfg.data_dir}" if cfg.data_dir else f"--{'task' if cfg.task else 'data'}"
        raise UsageError(f"cannot resume {path}: {changed} since it was saved: another data set is behind {where}; "
                         "restore that data to continue the run, or pass another --run-dir for a new run on this data")


def _check_compatible(ckpt: dict[str, Any], cfg: FitConfig, env: DistEnv, path: Path, total: int) -> None:
    saved = ckpt.get("config", {})
    diffs = [f"{option_name(k)} {saved.get(k)!r} -> {v!r}" for k, v in cfg.to_dict().items()
             if k not in RESUMABLE_CHANGES and k in saved and _differs(k, saved[k], v)]
    old_world = ckpt.get("world_size", env.world_size)
    if old_world != env.world_size and not cfg.global_batch_size:
        diffs.append(f"world size {old_world} -> {env.world_size}: a run continues on another number of processes "
                     "only with a fixed --global-batch-size")
    elif old_world != env.world_size:
        log.info("world size %d -> %d: the same global batch of %d, the same trajectory", old_world, env.world_size,
                 cfg.global_batch_size)
    if cfg.scheduler in ("cosine", "linear", "onecycle") and ckpt.get("total_steps", total) != total:
        diffs.append(f"total steps {ckpt['total_steps']} -> {total} (the {cfg.scheduler} schedule's length; "
                     "keep --epochs/--max-steps)")
    if diffs:
        raise UsageError(f"cannot resume {path}: settings differ from the checkpoint's ({'; '.join(diffs)}); "
                         "to continue that run, restore them (--run-dir alone reads its settings back); "
                         "for a new run, pass another --run-dir or leave --run-dir out")


def _differs(key: str, saved: Any, value: Any) -> bool:
    """A Task is the same one wherever its file now lives and however it is named."""
    if key == "task" and saved and value:
        return task_identity(saved) != task_identity(value)
    return saved != value


def _init_from(model: nn.Module, path: str, strict: bool) -> None:
    state, _ = checkpoint.read(path, "pass another --init-from")
    checkpoint.load_weights(model, state, f"--init-from {path}", strict=strict)
    log.info("initialised weights from %s", path)


def _check_same_optimization(ckpt: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """The optimizer and schedule are the checkpoint's (their state would not fit another's)."""
    saved = ckpt.get("optimization")
    diffs = optim.differences(saved, now) if saved is not None else []
    if diffs:
        raise UsageError(f"cannot resume {path}: the optimizer or schedule differs from the checkpoint's "
                         f"({'; '.join(diffs)}); to continue that run, restore it; for a new run, pass another "
                         "--run-dir or leave --run-dir out")


def _checkpoint_dict(trainer: Trainer, st: TrainState, policy: Policy, config: dict[str, Any], cfg: FitConfig,
                     env: DistEnv, total: int, tracker: Tracker, rngs: list[Any] | None,
                     with_tensors: bool) -> dict[str, Any]:
    """The checkpoint dict; without the model and optimizer for sharded checkpoints (DCP writes those)."""
    tensors = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()} if with_tensors else {}
    return {
        "version": checkpoint.FORMAT_VERSION,
        **tensors,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "epoch": st.epoch, "step": st.step, "batch_in_epoch": st.batch_in_epoch, "status": st.status,
        # world-size independent position in the epoch, for a resume on another number of processes
        "samples_in_epoch": st.batch_in_epoch * cfg.batch_size * env.world_size,
        "rng": rngs,
        "best": policy.best,
        "early_stopping": policy.state_dict(),
        "train_loss": [st.loss_sum, st.loss_count],
        "config": config,
        "world_size": env.world_size,
        "total_steps": total,
        "wandb_run_id": tracker.run_id,
        "versions": {"ddp_train": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
    }


def _restore(trainer: Trainer, st: TrainState, policy: Policy, ckpt: dict[str, Any], per_rank_samples: int,
             optimizer_too: bool) -> None:
    """Everything but the model weights (loaded before wrapping) and the RNG (restored last)."""
    if optimizer_too:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if trainer.scheduler is not None and ckpt.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scaler and ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    st.loss_sum, st.loss_count = ckpt.get("train_loss", [0.0, 0.0])
    st.epoch, st.step, st.batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
    if "samples_in_epoch" in ckpt:  # micro-batches of this world size
        st.batch_in_epoch = ckpt["samples_in_epoch"] // per_rank_samples
    st.status = ckpt.get("status", "running")
    policy.load_state_dict(ckpt.get("best"), ckpt.get("early_stopping", {}))


def _requeue(cfg: FitConfig, env: DistEnv) -> None:
    job = env.slurm_job_id
    if not (cfg.requeue and job and env.is_main):
        return
    log.info("requeueing Slurm job %s", job)  # before: the requeue may end this job at once
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        log.warning("--requeue: scontrol not found; requeue job %s by hand", job)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log.warning("--requeue: scontrol requeue %s failed: %s", job,
                    (getattr(e, "stderr", b"") or b"").decode().strip() or e)


def describe_task(task: Task, cfg: FitConfig) -> FitConfig:
    """The configuration with the task's class and settings recorded (for the user's own Task)."""
    if isinstance(task, BuiltinTask):
        return cfg
    return cfg.replace(task=spec_of(task), task_args=check_settings(task) or None)
