"""The optimizer and its learning-rate schedule: the built-in ones (--optimizer, --scheduler,
--warmup-steps) or the Task's own (`Task.optimizer`, `Task.scheduler`), described by what they are
so that config.json records them and a resume refuses a different one."""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import FitConfig
from .errors import UsageError

INTERVALS = ("step", "epoch")
# Per-run implementation choices, not hyper-parameters: a resume on another device may differ.
_IMPLEMENTATION = frozenset({"params", "initial_lr", "foreach", "fused", "capturable", "differentiable"})
# A scheduler's progress, not its settings.
_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
                       "verbose", "_schedulers", "lr_lambdas", "_initial_step"})


@dataclass(frozen=True)
class StepPlan:
    """How long the run is, in optimizer steps: what a schedule needs to know. `per_epoch` is None
    when the training data has no length (streaming)."""
    per_epoch: int | None
    total: int


@dataclass
class Schedule:
    """A learning-rate scheduler and when it steps: after every optimizer step, or every epoch."""
    scheduler: Any
    interval: str = "step"


def build_optimizer(cfg: FitConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The built-in optimizer: --optimizer over every trainable parameter, with --lr,
    --weight-decay (and --momentum for sgd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    cls: type[torch.optim.Optimizer]
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


def build_scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer, steps: StepPlan) -> Schedule | None:
    """The built-in schedule, stepped after every optimizer step: --warmup-steps of linear ramp,
    then --scheduler (cosine: to 0 over the rest of the run; linear: linear decay to 0, Hugging Face
    Trainer's default; step: x --lr-gamma every --lr-step-epochs; onecycle: its own warm-up)."""
    sched = torch.optim.lr_scheduler
    total = steps.total
    warmup = min(cfg.warmup_steps, total)
    if warmup and cfg.scheduler == "onecycle":
        raise UsageError("--scheduler onecycle has its own warm-up; drop --warmup-steps (or use cosine)")
    if cfg.scheduler == "step" and steps.per_epoch is None:
        raise UsageError("--scheduler step counts epochs, but streaming data has no epoch length; use "
                         "--scheduler cosine or linear (over --max-steps), or a Task.scheduler of your own")
    main: torch.optim.lr_scheduler.LRScheduler | None = None
    if cfg.scheduler == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    elif cfg.scheduler == "linear":
        main = sched.LambdaLR(optimizer, _LinearDecay(max(total - warmup, 1)))
    elif cfg.scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.lr_step_epochs * (steps.per_epoch or 1), gamma=cfg.lr_gamma)
    elif cfg.scheduler == "onecycle":
        main = sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if warmup:
        ramp = sched.LambdaLR(optimizer, _Ramp(warmup))
        main = ramp if main is None else sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
    return Schedule(main) if main is not None else None


class _Ramp:
    """Warm-up factor (s + 1) / (warmup + 1): the first step already moves, the last reaches 1."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, s: int) -> float:
        return min(1.0, (s + 1) / (self.warmup + 1))


class _LinearDecay:
    """Factor 1 - s / steps: from 1 at the first step after warm-up to 1 / steps at the last."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, s: int) -> float:
        return max(0.0, 1.0 - s / self.steps)


def task_optimizer(task: Any, cfg: FitConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The Task's optimizer (`Task.optimizer(model, cfg)`), else the built-in one. It must hold
    the model's own parameters (under FSDP: the sharded ones, which is why it is built after wrapping)."""
    made = task.optimizer(model, cfg)
    if made is None:
        return build_optimizer(cfg, model)
    name = type(task).__name__
    if not isinstance(made, torch.optim.Optimizer):
        raise UsageError(f"{name}.optimizer(model, cfg) must return a torch.optim.Optimizer (or None for "
                         f"--optimizer), got {type(made).__name__}")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in made.param_groups for p in g["params"]):
        raise UsageError(f"{name}.optimizer(model, cfg) holds tensors that are not the model's parameters; build "
                         "it from the `model` it is given (e.g. model.parameters() or model.named_parameters())")
    return made


def task_scheduler(task: Any, cfg: FitConfig, optimizer: torch.optim.Optimizer, steps: StepPlan) -> Schedule | None:
    """The Task's schedule (`Task.scheduler(optimizer, cfg, steps)`: a scheduler, stepped every
    optimizer step, or (scheduler, "step" | "epoch")), else the built-in --scheduler."""
    made = task.scheduler(optimizer, cfg, steps)
    if made is None:
        return build_scheduler(cfg, optimizer, steps)
    name = type(task).__name__
    scheduler, interval = made if isinstance(made, tuple) and len(made) == 2 else (made, "step")
    if interval not in INTERVALS:
        raise UsageError(f"{name}.scheduler(...) returned interval {interval!r}; use 'step' or 'epoch'")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise UsageError(f"{name}.scheduler(...): ReduceLROnPlateau steps on a metric, which ddp_train does not "
                         "feed it; use a schedule of steps or epochs")
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise UsageError(f"{name}.scheduler(optimizer, cfg, steps) must return a torch.optim.lr_scheduler "
                         f"scheduler, optionally with 'step' or 'epoch' (or None for --scheduler); got "
                         f"{type(made).__name__}")
    if scheduler.optimizer is not optimizer:
        raise UsageError(f"{name}.scheduler(...) must schedule the optimizer it is given")
    return Schedule(scheduler, interval)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What the optimizer is: its class and each parameter group's hyper-parameters and size.
    Call it before a scheduler changes the learning rates."""
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: _plain(v) for k, v in sorted(group.items()) if k not in _IMPLEMENTATION}
        hyper["params"] = [len(group["params"]), sum(p.numel() for p in group["params"])]  # tensors, elements
        groups.append(hyper)
    return {"class": _class_name(optimizer), "param_groups": groups}


def describe_schedule(schedule: Schedule | None) -> dict[str, Any] | None:
    """What the schedule is: its class(es), settings and interval (not its progress)."""
    if schedule is None:
        return None
    return {"interval": schedule.interval, **_describe_scheduler(schedule.scheduler)}


def _describe_scheduler(scheduler: Any) -> dict[str, Any]:
    state = scheduler.state_dict()
    out: dict[str, Any] = {"class": _class_name(scheduler)}
    out.update({k: _plain(v) for k, v in sorted(state.items()) if k not in _PROGRESS and _is_setting(v)})
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:
        out["lr_lambdas"] = [_describe_callable(f) for f in lambdas]
    inner = getattr(scheduler, "_schedulers", None)
    if inner:
        out["schedulers"] = [_describe_scheduler(s) for s in inner]
    return out


def describe(optimizer: torch.optim.Optimizer, schedule: Schedule | None) -> dict[str, Any]:
    """config.json's "optimization" section, and what a resume compares."""
    return {"optimizer": describe_optimizer(optimizer), "scheduler": describe_schedule(schedule)}


def differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Where two descriptions differ, as 'path old -> new' (the first few)."""
    out: list[str] = []
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(saved.keys() | now.keys(), key=str):
            out += differences(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for i, (a, b) in enumerate(zip(saved, now)):
            out += differences(a, b, f"{prefix}[{i}]")
    elif saved != now and not _close(saved, now):
        out.append(f"{prefix} {saved!r} -> {now!r}")
    return out[:3]


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)


def _class_name(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):  # a function or lambda given to LambdaLR
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _describe_callable(f: Any) -> Any:
    """A LambdaLR factor: a function by its name, a callable object by its class and attributes."""
    if isinstance(f, types.FunctionType):
        return _class_name(f)
    return {"class": _class_name(f), **_plain(vars(f))} if hasattr(f, "__dict__") else _class_name(f)


def _is_setting(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_setting(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, tensors as numbers, anything else by its repr."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # the same object on a resume: no address


__all__ = ["StepPlan", "Schedule", "build_optimizer", "build_scheduler", "task_optimizer", "task_scheduler",
           "describe", "describe_optimizer", "describe_schedule", "differences", "INTERVALS"]
