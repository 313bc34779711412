"""The strategy: DDP (several processes), FSDP2 (several processes, sharded), DataParallel (one
process, several GPUs; ddp_train.dataparallel), or the bare module. `wrap` returns what trains; the bare module stays the
handle for state dicts (under FSDP they are the same object: fully_shard works in place)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .distenv import DistEnv
from .errors import UsageError

log = logging.getLogger("ddp_train")


def resolve_strategy(strategy: str, env: DistEnv, precision: str = "32") -> str:
    several_gpus = env.device.startswith("cuda") and env.cuda_devices > 1
    if strategy == "auto":
        if several_gpus and not env.distributed:
            log.info("one process sees %d GPUs: DataParallel over all of them; `torchrun --nproc_per_node=%d -m "
                     "ddp_train fit ...` (DDP, a process per GPU) is faster", env.cuda_devices, env.cuda_devices)
        return "ddp" if env.distributed else "dp" if several_gpus else "single"
    if strategy == "fsdp":
        if precision == "fp16":
            raise UsageError("--strategy fsdp takes --precision bf16 or 32 (fp16 needs a gradient scaler that "
                             "understands sharded gradients)")
        if not env.distributed:
            log.info("--strategy fsdp in one process: nothing to shard, training the whole model here "
                     "(checkpoints stay sharded, so the run can move to more processes)")
            return "single"
        if precision == "bf16":
            log.info("--strategy fsdp --precision bf16: FSDP casts the parameters to bfloat16 in every layer but "
                     "BatchNorm's (LayerNorm and softmax included); one process computes under autocast instead, "
                     "so a run that moves between 1 and N processes continues a close trajectory, not the same one")
        return "fsdp"
    if strategy == "ddp" and not env.distributed:
        raise UsageError("--strategy ddp needs several processes: launch with "
                         "`torchrun --nproc_per_node=N -m ddp_train fit`, or use --strategy auto")
    if strategy in ("dp", "single") and env.distributed:
        raise UsageError(f"--strategy {strategy} runs in one process, but this job has "
                         f"{env.world_size}; use --strategy ddp (or auto)")
    if strategy == "dp" and not several_gpus:
        raise UsageError("--strategy dp needs one process that sees several CUDA GPUs; use --strategy auto")
    return strategy


def wrap(model: nn.Module, strategy: str, env: DistEnv, compile: bool, blocks: list[nn.Module] | None = None,
         precision: str = "32") -> nn.Module:
    """Returns the module to train; `model` stays the bare handle for state dicts and evaluation."""
    if strategy == "ddp":
        ids = [torch.device(env.device).index] if env.device.startswith("cuda") else None
        # Gradients as views into the all-reduce buckets: no second copy of them, no copy per step.
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                                 gradient_as_bucket_view=True)
    elif strategy == "fsdp":
        from .fsdp import shard

        wrapped = shard(model, blocks, precision=precision, device=env.device)
    elif strategy == "dp":
        from .dataparallel import ReplicaParallel

        wrapped = ReplicaParallel(model, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
    else:
        wrapped = model
    # torch's stubs type compile()'s result as a function; of a Module it is an OptimizedModule.
    return torch.compile(wrapped) if compile else wrapped  # type: ignore[return-value]
