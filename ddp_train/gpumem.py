"""CUDA memory figures (for the log lines and metrics.jsonl) and the one-line out-of-memory error."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .errors import RankError

GIB = 2 ** 30


def peaks(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GiB on `device` since the run started; empty off CUDA. Reads the
    caching allocator's counters on the host: no device sync."""
    if device.type != "cuda":
        return {}
    return {"max_mem_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "max_mem_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3)}


def describe(device: torch.device) -> str:
    """'cuda:1: peak 70.1 GiB allocated, 75.3 GiB reserved of 79.1 GiB', or the device alone off CUDA."""
    if device.type != "cuda":
        return str(device)
    mem = peaks(device)
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    return (f"{device}: peak {mem['max_mem_allocated_gib']:.1f} GiB allocated, "
            f"{mem['max_mem_reserved_gib']:.1f} GiB reserved of {total:.1f} GiB")


@contextlib.contextmanager
def named_oom(device: torch.device, where: str, evaluation: bool = False) -> Iterator[None]:
    """An out-of-memory error inside the block becomes one line that names the step, this rank's
    memory and what to lower. It is this rank's own (another GPU may have had room): RankError."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        lower = ("lower --eval-batch-size" if evaluation else
                 "lower --batch-size (raise --grad-accum to keep the global batch)")
        said = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise RankError(f"out of memory during {where} ({describe(device)}; {said}); {lower}, or shard the "
                        "model with --strategy fsdp") from e
