"""A run's process-wide numeric settings, set for the run and restored after it: deterministic
algorithms, TF32 and cuDNN autotuning.

On CUDA the default is what the fast references use (torchvision's classification reference,
nanoGPT): TF32 for float32 matmuls and convolutions, and `cudnn.benchmark` (cuDNN times its
algorithms once per input shape and keeps the fastest). `--no-tf32` keeps full float32;
`--deterministic` turns all three off and asks torch for deterministic kernels only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


@contextlib.contextmanager
def numerics(deterministic: bool, tf32: bool, device_type: str) -> Iterator[None]:
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.benchmark, os.environ.get(WORKSPACE))
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault(WORKSPACE, ":4096:8")  # deterministic cuBLAS (read at its first use)
        if device_type == "cuda":
            fast = tf32 and not deterministic
            torch.set_float32_matmul_precision("high" if fast else "highest")
            cudnn.allow_tf32, cudnn.benchmark = fast, fast
        yield
    finally:
        deterministic_before, warn_only, precision, allow_tf32, benchmark, workspace = saved
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only)
        if device_type == "cuda":
            torch.set_float32_matmul_precision(precision)
            cudnn.allow_tf32, cudnn.benchmark = allow_tf32, benchmark
        if workspace is None:
            os.environ.pop(WORKSPACE, None)
        else:
            os.environ[WORKSPACE] = workspace
