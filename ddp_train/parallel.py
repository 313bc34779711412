"""The wrap ladder: DDP (several processes) -> DataParallel (one process, several GPUs) -> bare."""

from __future__ import annotations

import torch
from torch import nn

from .distenv import DistEnv
from .errors import UsageError


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    several_gpus = env.device.startswith("cuda") and env.cuda_devices > 1
    if strategy == "auto":
        return "ddp" if env.distributed else "dp" if several_gpus else "single"
    if strategy == "ddp" and not env.distributed:
        raise UsageError("--strategy ddp needs several processes: launch with "
                         "`torchrun --nproc_per_node=N -m ddp_train fit`, or use --strategy auto")
    if strategy in ("dp", "single") and env.distributed:
        raise UsageError(f"--strategy {strategy} runs in one process, but this job has "
                         f"{env.world_size}; use --strategy ddp (or auto)")
    if strategy == "dp" and not several_gpus:
        raise UsageError("--strategy dp needs one process that sees several CUDA GPUs; use --strategy auto")
    return strategy


def wrap(model: nn.Module, strategy: str, env: DistEnv, compile: bool) -> nn.Module:
    """Returns the module to train; `model` stays the bare handle for state dicts and evaluation."""
    if strategy == "ddp":
        ids = [torch.device(env.device).index] if env.device.startswith("cuda") else None
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    elif strategy == "dp":
        wrapped = nn.DataParallel(model)
    else:
        wrapped = model
    return torch.compile(wrapped) if compile else wrapped
