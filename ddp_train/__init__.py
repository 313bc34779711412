"""ddp_train: train PyTorch models on one CPU, one GPU, many GPUs or many nodes with one command.

    from ddp_train import Task, fit

Importing the package stays light (no torch): `Task`, `fit` and the rest load on first use.
"""

__version__ = "0.1.0"

_LAZY = {"Task": "task", "fit": "api", "FitResult": "result", "FitConfig": "config", "UsageError": "errors",
         "TrainingError": "errors", "Stopped": "errors", "Preempted": "errors", "Interrupted": "errors",
         "TensorData": "data"}
__all__ = ["Task", "fit", "FitResult", "FitConfig", "UsageError", "TrainingError", "Stopped", "Preempted",
           "Interrupted", "TensorData", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ddp_train' has no attribute {name!r}")
