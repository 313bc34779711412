"""What a checkpoint holds beyond the model's and optimizer's own state dicts, and how saved
weights go back into a model: every rank's RNG state, host-memory snapshots of the state to be
written, prefix stripping and a weights load with one-line errors."""

from __future__ import annotations

import random
from typing import Any

import torch

from ..errors import UsageError

# Checkpoint entries that training never changes, so a snapshot need not walk them: the RNG states
# are fresh copies (rng_state, gather_object), the config and versions plain values built once.
UNCHANGING = frozenset({"rng", "config", "versions"})


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, this GPU's, Python's, NumPy's) as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own device only (the current one): get_rng_state_all() holds one state per
        # visible GPU, which a resume with fewer visible GPUs, or this rank on another index, cannot use.
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np
    except ImportError:
        return state
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # the global RandomState's MT19937 state (a dict only for other generators)
    name, keys, pos, has_gauss, cached = legacy
    state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (an older checkpoint's per-GPU list: this device's entry)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible at save time
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached"]))


def snapshot(obj: Any) -> Any:
    """A copy in host memory of a checkpoint dict's tensors, so that training can go on while it is
    written. GPU tensors go to pinned memory without blocking, one wait for all of them at the end
    (a pageable copy blocks per tensor at a fraction of the bandwidth); the pinned blocks return to
    torch's host cache when the write is done, for the next snapshot."""
    on_gpu: list[bool] = []
    copy = _copy(obj, on_gpu)
    if on_gpu:
        torch.cuda.synchronize()
    return copy


def _copy(obj: Any, on_gpu: list[bool]) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            on_gpu.append(True)
            return torch.empty_like(obj, device="cpu", pin_memory=True).copy_(obj.detach(), non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy(v, on_gpu) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        return type(obj)(_copy(v, on_gpu) for v in obj)
    return obj  # plain values, and lists of them, are not changed by training


def bare_key(key: str) -> str:
    """A state dict key as the unwrapped module names it: no DDP/DataParallel `module.` or
    torch.compile `_orig_mod.` prefixes."""
    while key.startswith(("_orig_mod.", "module.")):
        key = key.split(".", 1)[1]
    return key


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Accept state dicts saved from DDP/DataParallel or torch.compile wrappers."""
    return {bare_key(key): value for key, value in state.items()}


def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str, strict: bool = True) -> None:
    """load_state_dict with a one-line error naming the first mismatching keys and shapes."""
    own = model.state_dict()
    shape_diff = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shape_diff or (strict and (missing or unexpected)):
        parts = []
        if shape_diff:
            parts.append("shape mismatch: " + "; ".join(shape_diff[:3]))
        if strict and missing:
            parts.append("missing: " + ", ".join(missing[:3]))
        if strict and unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:3]))
        raise UsageError(f"{source} does not fit this model ({'; '.join(parts)}); check --model and the "
                         f"data's shape/classes{', or pass --no-init-strict for a partial load' if strict else ''}")
    model.load_state_dict(state, strict=strict)
