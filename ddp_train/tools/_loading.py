"""What evaluate and predict share: a checkpoint (or bare state dict) -> config, split, model,
and an exact evaluator inside the job's process group. Imports torch: load it from command bodies."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.torch_version import TorchVersion

from .. import checkpoint
from ..config import build_config, config_from_dict, parse_shape
from ..data import build_data_rank0_first, eval_loader
from ..dist import Comm, distributed
from ..distenv import DistEnv
from ..errors import UsageError
from ..evaluation import Evaluator
from ..models import build_model


@dataclass
class Loaded:
    cfg: Any  # FitConfig
    model: torch.nn.Module
    dataset: Any
    task: str
    num_outputs: int
    source: str  # "checkpoint (epoch E, step S)" or "state dict"


def read_weights(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(bare state dict, full checkpoint or None). Early checkpoints stored torch.__version__ as a
    TorchVersion (a str subclass) that weights_only refuses: allow just that class."""
    if not Path(path).is_file():
        raise UsageError(f"--checkpoint {path} does not exist (checkpoints live in RUN_DIR/checkpoints/)")
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with allow([TorchVersion]) if allow else contextlib.nullcontext():
        raw = checkpoint.load(path)
    if isinstance(raw, dict) and "version" in raw and "model" in raw:
        if raw["version"] > checkpoint.FORMAT_VERSION:
            raise UsageError(f"{path} has checkpoint format {raw['version']}, newer than this ddp_train "
                             f"reads ({checkpoint.FORMAT_VERSION}); upgrade ddp_train")
        return raw["model"], raw
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UsageError(f"{path} is neither a ddp_train checkpoint nor a state dict of tensors; save one "
                         "with torch.save(model.state_dict(), path)")
    return checkpoint.strip_prefixes(raw), None


def load(path: str, split: str, comm: Comm, *, data: str | None, data_dir: str | None,
         model: str | None, config: str | None) -> Loaded:
    """Every rank loads the same file and builds the same split and model (rank 0 downloads first)."""
    state, ckpt = read_weights(path)
    overrides = {"data": data, "data_dir": data_dir, "model": model}
    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        cfg = config_from_dict(ckpt["config"]).replace(**{k: v for k, v in overrides.items() if v})
        source = f"checkpoint (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})"
    else:
        if not data and not config:
            raise UsageError(f"{path} is a bare state dict: say what it was trained on with --data "
                             "and --model (or --config run.toml)")
        cfg, source = build_config(overrides, config), "state dict"
    bundle = build_data_rank0_first(cfg, comm)
    dataset = {"train": bundle.train, "val": bundle.val, "test": bundle.test}[split]
    if dataset is None:
        raise UsageError(f"data set {cfg.data} has no test split; use --split val")
    name = cfg.model or bundle.default_model
    net = build_model(name, bundle.input_shape, bundle.num_outputs, parse_shape(cfg.hidden, "--hidden"))
    checkpoint.load_weights(net, state, path)
    return Loaded(cfg.replace(model=name), net, dataset, bundle.task, bundle.num_outputs, source)


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
    size = batch_size or cfg.eval_batch_size or 4 * cfg.batch_size
    precision = "32" if cfg.precision == "fp16" and device.type != "cuda" else cfg.precision
    loader = eval_loader(loaded.dataset, size, env.rank, env.world_size, cfg.workers, device.type == "cuda")
    loaded.model.to(device)
    return Evaluator(loader, loaded.task, loaded.num_outputs, device, comm, precision)


def renamed(results: dict[str, float], split: str) -> dict[str, float]:
    """Evaluator names everything val_*: name the figures after the split actually measured."""
    return {f"{split}_{k[4:]}" if k.startswith("val_") else k: v for k, v in results.items()}
