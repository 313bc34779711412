"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`): each rank keeps only
its shard of every parameter, gradient and optimizer state; a block's full parameters exist only
while it runs (all-gathered before, freed after), and gradients are reduce-scattered.

Ordering for a training loop (all ranks, same order):
  1. build the model, move it to the device, load any --init-from weights into the bare module;
  2. `shard(model, ...)` (in place; parameters become DTensors);
  3. create the optimizer from `model.parameters()` (it must see the sharded parameters);
  4. forward/backward on every rank; `clip_grad_norm`; `optimizer.step()`.
Evaluation can call the sharded model on every rank (each forward all-gathers what it needs), so
it must run on all ranks, like training. `full_state_dict` / `checkpoint.sharded.save` are collectives too.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .checkpoint.state import bare_key
from .errors import UsageError

PRECISIONS = {"32": None, "bf16": torch.bfloat16}


PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The units that get their own all-gather: the model's repeated blocks, found top-down (a
    transformer's layers, a ResNet's bottlenecks, a ConvNeXt's or Swin's blocks): every submodule
    whose class occurs more than once in the model and has layers of its own, outermost first.
    Plain containers (Sequential, ModuleList, ModuleDict) are walked through, and the layers
    outside any block (a stem, the head, norms) stay with the root. A model without repeated
    blocks (the built-in mlp/cnn: a flat Sequential of layers) gets one unit per layer with
    parameters. Pass your own list to shard() when this is not what you want."""
    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    def composite(m: nn.Module) -> bool:
        return type(m) not in PLAIN_CONTAINERS and any(True for _ in m.children()) and has_params(m)

    kinds: dict[type, int] = {}
    for m in model.modules():
        if m is not model and composite(m):
            kinds[type(m)] = kinds.get(type(m), 0) + 1
    repeated = {k for k, n in kinds.items() if n > 1}

    def walk(m: nn.Module) -> list[nn.Module]:
        found: list[nn.Module] = []
        for child in m.children():
            if type(child) in repeated:
                found.append(child)
            elif any(True for _ in child.children()):
                found += walk(child)
        return found

    blocks = walk(model) if repeated else []
    if blocks:
        return blocks
    return [m for m in model.modules() if m is not model and not any(True for _ in m.children()) and has_params(m)]


def shard(model: nn.Module, blocks: list[nn.Module] | None = None, *, precision: str = "32",
          device: str | torch.device = "cpu") -> nn.Module:
    """fully_shard each block, then the root (which takes every parameter not in a block), over
    all ranks of the default process group. Returns `model` itself, modified in place: its
    parameters are now sharded DTensors, so create the optimizer afterwards. The model must already
    be on `device`. precision "bf16": compute in bfloat16 (FSDP casts the parameters as it gathers
    them: no autocast needed), reduce gradients, keep the sharded (optimizer-facing) parameters and
    return the model's output in float32; "32": no casting. fp16 is refused (it needs a gradient
    scaler that understands sharded gradients)."""
    if precision not in PRECISIONS:
        raise UsageError(f"FSDP precision {precision!r} is not supported; choose {', '.join(PRECISIONS)}")
    if not dist.is_initialized():
        raise UsageError("FSDP needs a process group: launch with torchrun (one process is fine)")
    if isinstance(model, FSDPModule):
        raise UsageError("this model is already sharded")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = PRECISIONS[precision]
    policy = root_policy = MixedPrecisionPolicy()
    if dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # The model's output (logits) in float32, so that the loss is computed in float32.
        root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    # FSDP2 shards contiguous parameters only: a channels_last model keeps that layout in its
    # inputs (a convolution follows its input's memory format), its weights become contiguous.
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    norms = running_stat_norms(model) if dtype is not None else []
    for norm in norms:
        fully_shard(norm, mesh=mesh, mp_policy=MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=dtype))
    for block in default_blocks(model) if blocks is None else blocks:
        if block is model:
            raise UsageError("the root model is not a block: it is sharded last, by shard() itself")
        if not any(block is n for n in norms):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


def running_stat_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with
    track_running_stats), other than the root. Under bf16 each is sharded as a unit of its own
    that computes in float32 (its inputs cast up, its output back to bf16), as FSDP1's
    MixedPrecision leaves _BatchNorm modules out of the cast by default: their float32 running
    statistics cannot meet bf16 weights, and batch statistics are too coarse in bf16. LayerNorm,
    GroupNorm and RMSNorm have no running statistics and stay in their block's bf16, as in
    torchtitan. Costs one small all-gather per such layer and forward."""
    return [m for m in model.modules() if m is not model and isinstance(m, nn.modules.batchnorm._NormBase)
            and m.track_running_stats and any(True for _ in m.parameters())]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global 2-norm is at most `max_norm`, and return
    the norm before clipping as a plain tensor on the gradients' device, the same on every rank
    (inf/nan propagate, as with torch.nn.utils.clip_grad_norm_).

    Works for sharded (DTensor, FSDP2) and plain gradients, as torchtitan clips: torch's foreach
    norms of the local shards, one all-reduce of the total (`full_tensor`), no host sync."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@contextlib.contextmanager
def accumulating(model: nn.Module, is_last_micro: bool) -> Iterator[None]:
    """Run one micro-batch's forward and backward inside this block: gradients are synchronised
    (reduce-scattered for FSDP2, all-reduced for DDP) only when `is_last_micro`; the others
    accumulate locally, in full size (FSDP2 keeps the unsharded gradient until the last one).
    A bare module (one process) just accumulates."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(is_last_micro)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not is_last_micro:
        with model.no_sync():
            yield
    else:
        yield


def full_state_dict(model: nn.Module, *, all_ranks: bool = False) -> dict[str, Any]:
    """Collective: the bare module's full state dict (keys as in the unwrapped model's
    state_dict(), plain CPU tensors). On rank 0 only (empty dict elsewhere) unless `all_ranks`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    state = get_model_state_dict(model, options=options)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[bare_key(key)] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards only)."""
    def size(t: torch.Tensor) -> int:
        t = _local(t)
        return t.numel() * t.element_size()
    out = {"params": sum(size(p) for p in model.parameters()),
           "grads": sum(size(p.grad) for p in model.parameters() if p.grad is not None), "optim": 0}
    if optimizer is not None:
        out["optim"] = sum(size(v) for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor))
    return out


__all__ = ["shard", "default_blocks", "running_stat_norms", "clip_grad_norm", "accumulating", "full_state_dict", "local_bytes"]
