"""`ddp-train evaluate`: a checkpoint's metrics on a split, exact under any number of processes."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Optional

import typer


class Split(str, Enum):
    val = "val"
    test = "test"
    train = "train"


CHECKPOINT = typer.Option("--checkpoint", "-c", help="A ddp_train checkpoint, or a bare state dict "
                          "(then give --data and --model).", show_default=False)
SPLIT = typer.Option("--split", help="Which split of the data set.")
DATA = typer.Option("--data", help="Data set (default: the checkpoint's).")
DATA_DIR = typer.Option("--data-dir", help="Folder of file-based data sets (default: the checkpoint's).")
MODEL = typer.Option("--model", help="Model name, for a bare state dict (default: the data set's own).")
CONFIG = typer.Option("--config", help="TOML of fit options describing a bare state dict's data and model.")
TRUST = typer.Option("--trust-code", help="Code the checkpoint names (its --task, or a --data/--model "
                     "module:function) that you have read and allow to run; repeat for several. Without it, "
                     "such a checkpoint is refused (docs/security.md).", show_default=False)
BATCH = typer.Option("--batch-size", min=1, help="Samples per evaluation chunk "
                     "(default: the run's eval batch size).")


def evaluate(
    checkpoint: Annotated[str, CHECKPOINT],
    split: Annotated[Split, SPLIT] = Split.val,
    data: Annotated[Optional[str], DATA] = None,
    data_dir: Annotated[Optional[str], DATA_DIR] = None,
    model: Annotated[Optional[str], MODEL] = None,
    config: Annotated[Optional[str], CONFIG] = None,
    batch_size: Annotated[Optional[int], BATCH] = None,
    trust_code: Annotated[Optional[list[str]], TRUST] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Metrics of a checkpoint on the validation (or test) split.

    Under torchrun or srun every process evaluates a share of the samples; the figures are the
    same as one process's, to the last digit.

    Examples:

      ddp-train evaluate --checkpoint runs/x/checkpoints/best.pt

      torchrun --standalone --nproc_per_node=4 -m ddp_train evaluate -c best.pt --split test --json

      ddp-train evaluate -c weights.pt --data mnist --data-dir /data --model cnn   # bare state dict
    """
    from . import _loading

    with _loading.job() as (env, comm, device):
        loaded = _loading.load(checkpoint, split.value, comm, data=data, data_dir=data_dir, trust_code=trust_code,
                               model=model, config=config)
        results = _loading.renamed(_loading.evaluator(loaded, batch_size, env, comm, device)(loaded.model),
                                   split.value)
    if not env.is_main:
        return
    report = {"checkpoint": checkpoint, "source": loaded.source, "data": loaded.name,
              "split": split.value, "samples": len(loaded.dataset), "model": loaded.cfg.model,
              "world_size": env.world_size, "device": env.device, "metrics": results}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{checkpoint}: {loaded.source}")
    procs = f"{env.world_size} process{'es' if env.world_size > 1 else ''}"
    model = f", model {loaded.cfg.model}" if loaded.cfg.model else ""
    typer.echo(f"{loaded.name} {split.value} split, {len(loaded.dataset)} samples{model}, {procs} on {env.device}\n")
    width = max(len(k) for k in results)
    typer.echo(f"{'metric':<{width}}  value")
    for name, value in results.items():
        typer.echo(f"{name:<{width}}  {value:.6f}")
