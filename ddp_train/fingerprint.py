"""A cheap identity of a run's data, so that a resume notices another data set behind the same
--data-dir: the sizes of the splits and a hash of three validation samples (first, middle, last).
The validation set is hashed because it is map-style and unaugmented; the training set, which may
be streamed or augmented by epoch, contributes its size where it has one."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def data_fingerprint(splits: dict[str, Any]) -> dict[str, Any]:
    """{"train_samples", "val_samples", "val_hash"}; None where a split cannot tell (streamed)."""
    sizes = {f"{name}_samples": _size(splits[name]) for name in ("train", "val")}
    val, n = splits["val"], sizes["val_samples"]
    digest = None
    if n and hasattr(val, "__getitem__"):
        h = hashlib.sha1()
        for i in sorted({0, n // 2, n - 1}):
            _update(h, val[i])
        digest = h.hexdigest()[:16]
    return {**sizes, "val_hash": digest}


def describe_change(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, for an error message; None if nothing does."""
    parts = [f"{key.replace('_', ' ')} {saved[key]} -> {now[key]}" for key in ("train_samples", "val_samples")
             if saved.get(key) is not None and now.get(key) is not None and saved[key] != now[key]]
    if not parts and saved.get("val_hash") and now.get("val_hash") and saved["val_hash"] != now["val_hash"]:
        parts.append("validation samples with other contents")
    return "the data changed (" + ", ".join(parts) + ")" if parts else None


def _size(split: Any) -> int | None:
    try:
        return len(split)
    except TypeError:
        return None


def _update(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _update(h, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _update(h, item)
    elif isinstance(value, (int, float, str, bytes, bool)) or value is None:
        h.update(repr(value).encode())
    elif hasattr(value, "tobytes"):  # numpy arrays, PIL images
        h.update(value.tobytes())
    else:
        h.update(type(value).__name__.encode())
