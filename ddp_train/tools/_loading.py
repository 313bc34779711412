"""What evaluate and predict share: a checkpoint (or bare state dict) -> config, task, split, model,
and an exact evaluator inside the job's process group, all built through fit's own paths.
Imports torch: load it from command bodies."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .. import checkpoint
from ..config import build_config, config_from_dict, named_code
from ..data import eval_loader, rank0_first
from ..dist import Comm, distributed
from ..distenv import DistEnv
from ..errors import UsageError
from ..evaluation import Evaluator
from ..task import BuiltinTask, Task, absolute_spec, from_config
from ..train import _data, eval_batch_size, eval_seed
from ..userfn import user_code


@dataclass
class Loaded:
    cfg: Any  # FitConfig
    task: Task
    model: torch.nn.Module
    dataset: Any
    source: str  # "checkpoint (epoch E, step S)" or "state dict"
    collate: Any = None  # the Task's collate function for the split, if any

    @property
    def kind(self) -> str | None:
        """classification / regression: the built-in task's, or what a Task's eval_step gives."""
        return self.task.bundle.kind if isinstance(self.task, BuiltinTask) else task_kind(self)

    @property
    def classes(self) -> list[str] | None:
        return self.task.bundle.classes if isinstance(self.task, BuiltinTask) else None

    @property
    def name(self) -> str:
        return self.cfg.task or self.cfg.data


def task_kind(loaded: Loaded) -> str | None:
    """A Task is a classification when its eval_step on two samples gives integer targets and one
    row of outputs per target (what the default criterion trains with cross-entropy), a regression
    when its targets are floats shaped like its outputs; else None (raw outputs)."""
    from torch.utils.data import default_collate

    from ..batch import move_to
    from ..data import CLASSIFICATION, REGRESSION

    ds, net = loaded.dataset, loaded.model
    try:
        n = min(2, len(ds))
        batch = ds[slice(0, n)] if hasattr(ds, "x") else default_collate([ds[i] for i in range(n)])
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        with torch.no_grad():
            out, target = loaded.task.eval_step(net, move_to(batch, device, False))
        net.train(was_training)
    except Exception:  # a Task whose batches this cannot build: its raw outputs
        return None
    if not (isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if not target.is_floating_point() and out.dim() == 2 and out.shape[0] == target.numel():
        return CLASSIFICATION
    return REGRESSION if target.is_floating_point() and target.numel() == out.numel() else None


def load(path: str, split: str, comm: Comm, *, data: str | None, data_dir: str | None,
         model: str | None, config: str | None, trust_code: list[str] | None = None) -> Loaded:
    """Every rank loads the same file and builds the same split and model (rank 0 downloads first).
    Code the checkpoint names runs only if `trust_code` names it too (see `check_named_code`)."""
    state, ckpt = checkpoint.read(path, "evaluate another checkpoint (RUN_DIR/checkpoints/step-*.pt)")
    overrides = {"data": data, "data_dir": data_dir, "model": model}
    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        check_named_code(path, ckpt["config"], {k for k, v in overrides.items() if v}, trust_code or [])
        cfg = config_from_dict(ckpt["config"]).replace(**{k: v for k, v in overrides.items() if v})
        source = f"checkpoint (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})"
    else:
        if not data and not config:
            raise UsageError(f"{path} is a bare state dict: say what it was trained on with --data "
                             "and --model (or --config run.toml)")
        cfg, source = build_config(overrides, config), "state dict"
    task = from_config(cfg)
    splits = rank0_first(lambda: _data(task, cfg), cfg.download, comm)
    if splits.get(split) is None:
        raise UsageError(f"data set {cfg.task or cfg.data} has no {split} split; use --split val")
    if isinstance(task, BuiltinTask):
        cfg = cfg.replace(model=task.model_name)
    with user_code("--task" if cfg.task else "--model", cfg.task or cfg.model, "building the model"):
        net = task.model(cfg)
    checkpoint.load_weights(net, state, path)
    with user_code("--task" if cfg.task else "--data", cfg.task or cfg.data, "choosing its collate function"):
        collate = task.collate(split)
    return Loaded(cfg, task, net, splits[split], source, collate)


def check_named_code(path: str, saved: dict[str, Any], overridden: set[str], trusted: list[str]) -> None:
    """Refuse a checkpoint whose config names code (a Task class, a data or model function) that
    the user neither replaced (--data, --model) nor named with --trust-code."""
    allowed = {absolute_spec(spec) for spec in trusted} | set(trusted)
    unnamed = [spec for k, spec in named_code(saved) if k not in overridden and spec not in allowed]
    if unnamed:
        raise UsageError(f"{path} names code to run ({', '.join(unnamed)}); a checkpoint's code runs only when "
                         f"you name it: after reading that code, pass "
                         f"{' '.join('--trust-code ' + spec for spec in unnamed)}")


@contextlib.contextmanager
def job(timeout_s: float = 600.0) -> Iterator[tuple[DistEnv, Comm, torch.device]]:
    """This process's place in the launch (one process, torchrun or srun) and its device."""
    env = DistEnv.from_environ(os.environ, cuda_devices=torch.cuda.device_count())
    device = torch.device(env.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with distributed(env, timeout_s) as comm:
        yield env, comm, device


def evaluator(loaded: Loaded, batch_size: int | None, env: DistEnv, comm: Comm,
              device: torch.device) -> Evaluator:
    """Fixed global chunks of `batch_size` dealt round-robin: the same figures for any world size."""
    cfg = loaded.cfg
    size = batch_size or eval_batch_size(cfg)
    precision = "32" if cfg.precision == "fp16" and device.type != "cuda" else cfg.precision
    loader, chunks = eval_loader(loaded.dataset, size, env.rank, env.world_size, cfg.workers, device.type == "cuda",
                                 loaded.collate, eval_seed(loaded.task, cfg))
    loaded.model.to(device)
    return Evaluator(loaded.task, loader, chunks, device, comm, precision, seed=eval_seed(loaded.task, cfg))


def renamed(results: dict[str, float], split: str) -> dict[str, float]:
    """Evaluator names everything val_*: name the figures after the split actually measured."""
    return {f"{split}_{k[4:]}" if k.startswith("val_") else k: v for k, v in results.items()}
