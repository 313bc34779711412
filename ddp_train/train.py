"""One `fit`: config + environment -> process group -> data, model, resume -> loop -> teardown."""

from __future__ import annotations

import os
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, loop
from .config import RESUMABLE_CHANGES, FitConfig, dump_json, parse_shape
from .data import build_data_rank0_first, check_sizes, eval_loader, train_loader
from .dist import Comm, distributed
from .distenv import DistEnv
from .errors import EXIT_OK, EXIT_PREEMPTED, AgreedError, PeerFailure, UsageError
from .evaluation import Evaluator
from .log import NullFiles, NullProgress, Progress, RunFiles, Tracker, WandbTracker, log, setup_logging
from .models import build_model
from .parallel import resolve_strategy, wrap
from .preempt import PreemptFlag

OUR_FILES = ("config.json", "history.csv", "metrics.jsonl")
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_fit(cfg: FitConfig, env: DistEnv) -> int:
    setup_logging(env.rank, cfg.log_all_ranks)
    preempt = PreemptFlag(cfg.preempt_signal)
    try:
        with distributed(env, cfg.timeout) as comm:
            try:
                return _fit(cfg, env, comm, preempt)
            except AgreedError as e:
                # Print now, while SIGTERM only sets a flag: torchrun stops rank 0 as soon as
                # another rank has exited with the same error.
                if env.is_main:
                    if cfg.debug:
                        traceback.print_exc()
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    e.reported = True
                raise
            except (RuntimeError, ConnectionError) as e:
                peer = comm.peer_failure()
                if peer:
                    raise PeerFailure(peer) from e
                if any(s in str(e) for s in PEER_LOST):
                    raise PeerFailure("another rank died (its connection closed); its own log says why") from e
                raise
    finally:
        preempt.restore()


def _fit(cfg: FitConfig, env: DistEnv, comm: Comm, preempt: PreemptFlag) -> int:
    device = torch.device(env.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU (CPUs lack fast fp16 and GradScaler support); "
                         "use --precision bf16 or 32 on CPU")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    strategy = resolve_strategy(cfg.strategy, env)
    _seed(cfg.seed)

    bundle = build_data_rank0_first(cfg, comm)
    check_sizes(bundle, env.world_size)
    model_name = cfg.model or bundle.default_model
    resolved = cfg.replace(model=model_name)
    _check_monitor(cfg, bundle.task)
    if cfg.data_on_device and device.type == "cuda":
        bundle.train, bundle.val = bundle.train.to(device), bundle.val.to(device)

    samples_per_rank = -(-len(bundle.train) // env.world_size)  # what DistributedSampler gives each rank
    per_epoch, total = loop.plan(cfg, -(-samples_per_rank // cfg.batch_size))
    run_dir, ckpt_path = comm.rank0(_prepare_run_dir, resolved, env)
    ckpt = checkpoint.load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None:  # before any weights load: name the differing settings, not tensor shapes
        _check_compatible(ckpt, resolved, env, ckpt_path, total)

    model = build_model(model_name, bundle.input_shape, bundle.num_outputs, parse_shape(cfg.hidden, "--hidden"))
    if cfg.init_from and ckpt is None:
        _init_from(model, cfg)
    if ckpt is not None:
        checkpoint.load_weights(model, ckpt["model"], str(ckpt_path))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    wrapped = wrap(model, strategy, env, cfg.compile)
    ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else getattr(wrapped, "_orig_mod", None)
    ddp = ddp if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) else None
    optimizer = _optimizer(cfg, model)
    loader = train_loader(bundle.train, cfg, env.rank, env.world_size, device.type == "cuda")
    sampler = getattr(loader.sampler, "sampler", loader.sampler)  # under the BatchSampler, if any
    scheduler = _scheduler(cfg, optimizer, per_epoch, total)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    evaluator = Evaluator(eval_loader(bundle.val, cfg.eval_batch_size or 4 * cfg.batch_size, env.rank,
                                      env.world_size, cfg.workers, device.type == "cuda"),
                          bundle.task, bundle.num_outputs, device, comm, cfg.precision)

    main = env.is_main
    files = RunFiles(run_dir) if main else NullFiles()
    extra = {"world_size": env.world_size, "launcher": env.launcher, "backend": env.backend,
             "device": env.device, "strategy": strategy, "run_dir": str(run_dir)}
    if main:
        dump_json(resolved, extra, run_dir / "config.json")
    tracker: Tracker = Tracker()
    if main and cfg.wandb:
        tracker = WandbTracker(cfg.wandb_project, cfg.wandb_name or run_dir.name, run_dir,
                               {**resolved.to_dict(), **extra}, ckpt.get("wandb_run_id") if ckpt else None)
    progress = Progress(cfg.progress) if main else NullProgress()
    run = loop.Run(cfg=cfg, env=env, comm=comm, model=model, wrapped=wrapped, ddp=ddp, optimizer=optimizer,
                   scheduler=scheduler, scaler=scaler, loader=loader, sampler=sampler, evaluator=evaluator,
                   task=bundle.task, device=device, ckpt_dir=run_dir / "checkpoints", total_steps=total, files=files,
                   tracker=tracker, progress=progress, preempt=preempt, resolved=resolved.to_dict())
    log.info("ddp_train: launcher=%s world_size=%d backend=%s device=%s strategy=%s run_dir=%s",
             env.launcher, env.world_size, env.backend, env.device, strategy, run_dir)
    if ckpt is not None:
        loop.restore(run, ckpt)
        files.truncate_after(run.state.step)
        checkpoint.set_rng_state(ckpt["rng"][env.rank])
        log.info("resumed from %s: epoch %d, step %d, batch %d", ckpt_path, ckpt["epoch"], ckpt["step"],
                 ckpt["batch_in_epoch"])
        if run.state.step >= total or run.state.epoch >= cfg.epochs:
            log.info("nothing to do: the run in %s already finished (step %d of %d); raise --epochs or "
                     "--max-steps to train longer, or pass another --run-dir", run_dir, run.state.step, total)
            files.close()
            return EXIT_OK
    started = time.perf_counter()
    code = 1
    try:
        outcome = loop.fit(run)
        code = EXIT_PREEMPTED if outcome == "preempted" else EXIT_OK
    finally:
        progress.close()
        files.event("end", step=run.state.step, exit_code=code)
        files.close()
        tracker.finish(code)
    if outcome != "preempted":
        best = f"{run.state.best:.4g}" if run.state.best is not None else "n/a"
        log.info("done: %d steps in %.1fs; best %s %s; run dir %s", run.state.step,
                 time.perf_counter() - started, cfg.monitor, best, run_dir)
    return code


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def _check_monitor(cfg: FitConfig, task: str) -> None:
    names = ["train_loss", "val_loss"] + (["val_acc", "val_f1"] if task == "classification"
                                          else ["val_mse", "val_mae", "val_r2"])
    if cfg.monitor not in names:
        raise UsageError(f"--monitor {cfg.monitor} is not a metric of this {task} run; choose one of "
                         f"{', '.join(names)}")


def _prepare_run_dir(cfg: FitConfig, env: DistEnv) -> tuple[Path, Path | None]:
    """Rank 0: choose and create the run directory and pick the checkpoint to resume, if any."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{cfg.data}-{cfg.model}")
        run_dir = Path("runs") / f"{slug}-{env.run_id or time.strftime('%Y%m%d-%H%M%S')}"
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
        latest = checkpoint.find_latest(ckpt_dir)
        if latest is not None:
            return run_dir, latest
        cfg = cfg.replace(overwrite=True)  # nothing was saved yet: the partial files may go
    if resume not in ("auto", "never"):
        return run_dir, Path(resume)
    existing = checkpoint.candidates(ckpt_dir) + [run_dir / f for f in OUR_FILES if (run_dir / f).exists()]
    if resume == "never":
        if existing and not cfg.overwrite:
            raise UsageError(f"{run_dir} already holds a run; pass --overwrite to replace it, --resume auto "
                             "to continue it, or another --run-dir")
        for path in existing + [ckpt_dir / "best.pt"]:
            path.unlink(missing_ok=True)
        return run_dir, None
    return run_dir, checkpoint.find_latest(ckpt_dir)


def _check_compatible(ckpt: dict[str, Any], cfg: FitConfig, env: DistEnv, path: Path, total: int) -> None:
    saved = ckpt.get("config", {})
    diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in cfg.to_dict().items()
             if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if ckpt.get("world_size", env.world_size) != env.world_size:
        diffs.append(f"world size {ckpt['world_size']} -> {env.world_size}")
    if cfg.scheduler in ("cosine", "onecycle") and ckpt.get("total_steps", total) != total:
        diffs.append(f"total steps {ckpt['total_steps']} -> {total} (the {cfg.scheduler} schedule's length; "
                     "keep --epochs/--max-steps)")
    if diffs:
        raise UsageError(f"cannot resume {path}: settings differ from the checkpoint's ({'; '.join(diffs)}); "
                         "restore them, or start a new run (--resume never, or another --run-dir; "
                         "--init-from takes its weights only)")


def _init_from(model: torch.nn.Module, cfg: FitConfig) -> None:
    state = checkpoint.load(cfg.init_from)
    if isinstance(state, dict) and "model" in state and "version" in state:
        state = state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"--init-from {cfg.init_from} holds no state dict")
    checkpoint.load_weights(model, checkpoint.strip_prefixes(state), f"--init-from {cfg.init_from}",
                            strict=cfg.init_strict)
    log.info("initialised weights from %s", cfg.init_from)


def _optimizer(cfg: FitConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        cls, kwargs["momentum"] = torch.optim.SGD, cfg.momentum
    else:
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    try:
        # One kernel for all parameters: ~20% off a small model's step on CPU (torch's CPU default is
        # a Python loop over tensors), and the fast path on GPUs.
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, **kwargs)


def _scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer, per_epoch: int, total: int) -> Any:
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "step":
        return sched.StepLR(optimizer, step_size=cfg.lr_step_epochs * per_epoch, gamma=cfg.lr_gamma)
    if cfg.scheduler == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return None
