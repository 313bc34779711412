"""Loading the user's own `package.module:function` for --data and --model."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from .errors import UsageError


def load_user_function(spec: str, option: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{option} {spec!r}: write it as package.module:function")
    if "" not in sys.path:
        sys.path.insert(0, "")  # console scripts do not put the working directory on the path
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{option} {spec!r}: cannot import {module_name} ({e}); check the name and "
                         "that it is on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{option} {spec!r}: {module_name} has no function {attr!r}")
    return fn
