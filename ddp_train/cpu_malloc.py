"""Keep a CPU run's large blocks in the process between steps (glibc only).

glibc hands every block above its mmap threshold (128 KiB, rising to at most 32 MiB) straight
back to the kernel on free. A training step frees and re-allocates the same multi-megabyte
activations and gradients, so each step page-faults them in again: ~15% of a small CNN's step on
CPU. Raising the mmap and trim thresholds keeps those blocks in the heap for the next step.

The setting is process-wide and stays after fit() returns. It is left alone when the user has
set any of glibc's own malloc variables, and does nothing under another allocator (musl, macOS,
jemalloc or tcmalloc preloaded: they do not read glibc's parameters).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks up to this come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # free memory at the heap's top kept before returning it
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_tuned(env: Mapping[str, str]) -> bool:
    return any(v in env for v in _USER_VARS) or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")


def describe(env: Mapping[str, str]) -> str:
    """What a CPU run does to malloc here, for `ddp-train env`."""
    import platform

    lib, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or lib != "glibc":
        return "not glibc: left as it is"
    if user_tuned(env):
        return f"glibc {version}: your MALLOC_* / GLIBC_TUNABLES settings, left as they are"
    return (f"glibc {version}: CPU runs keep blocks up to {MMAP_THRESHOLD >> 20} MiB in the heap "
            "(a MALLOC_*_THRESHOLD_ variable set here keeps yours)")


def keep_large_blocks(env: Mapping[str, str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds; True when they were set."""
    if not sys.platform.startswith("linux") or user_tuned(env):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
