"""`ddp-train predict`: a model's outputs for every sample of a split, in data set order."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import UsageError
from .evaluate import BATCH, CHECKPOINT, CONFIG, DATA, DATA_DIR, MODEL, TRUST, Split

FORMATS = (".csv", ".pt")


def predict(
    checkpoint: Annotated[str, CHECKPOINT],
    output: Annotated[str, typer.Option("--output", "-o", help="File to write: .csv, or .pt for raw tensors.",
                                        show_default=False)],
    split: Annotated[Split, typer.Option("--split", help="Which split of the data set.")] = Split.val,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes (with probabilities) per row "
                                       "of a classification CSV.")] = 3,
    data: Annotated[Optional[str], DATA] = None,
    data_dir: Annotated[Optional[str], DATA_DIR] = None,
    model: Annotated[Optional[str], MODEL] = None,
    config: Annotated[Optional[str], CONFIG] = None,
    batch_size: Annotated[Optional[int], BATCH] = None,
    trust_code: Annotated[Optional[list[str]], TRUST] = None,
) -> None:
    """Predictions for a data set split, written once by rank 0 in data set order.

    Every process predicts a share of the samples; rank 0 gathers them. CSV columns:
    classification: index, predicted, class_1, prob_1, ... (top-k softmax probabilities);
    regression: index, value (or value_0, value_1, ...). A .pt file holds {"index", "outputs"}
    tensors (raw logits or values).

    Examples:

      ddp-train predict --checkpoint runs/x/checkpoints/best.pt --output preds.csv

      torchrun --standalone --nproc_per_node=4 -m ddp_train predict -c best.pt -o test.pt --split test

      ddp-train predict -c best.pt -o train.csv --split train --top-k 5
    """
    path = Path(output)
    if path.suffix not in FORMATS:
        raise UsageError(f"--output {output}: write a .csv or a .pt file")
    from . import _loading

    with _loading.job() as (env, comm, device):
        comm.rank0(_check_writable, path)
        loaded = _loading.load(checkpoint, split.value, comm, data=data, data_dir=data_dir, trust_code=trust_code,
                               model=model, config=config)
        pieces: list = []
        results = _loading.evaluator(loaded, batch_size, env, comm, device)(loaded.model, outputs=pieces)
        gathered = comm.gather_object(pieces)
        outputs = in_order(gathered) if gathered is not None else None  # rank 0's
        comm.rank0(write, path, outputs, loaded.kind, top_k, loaded.classes)
    if outputs is not None:  # rank 0
        figures = " ".join(f"{k} {v:.4g}" for k, v in _loading.renamed(results, split.value).items())
        typer.echo(f"wrote {len(outputs)} predictions of the {split.value} split to {path} ({figures})", err=True)


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {path}: cannot create {path.parent} ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--output {path}: {path.parent} is not writable")


def in_order(per_rank: list[list[tuple[int, Any]]]) -> Any:
    """One tensor from every rank's (chunk id, outputs) pairs, sorted back into data set order."""
    import torch

    pieces = sorted((pair for pairs in per_rank for pair in pairs), key=lambda pair: pair[0])
    return torch.cat([out for _, out in pieces])


def write(path: Path, outputs: Any, kind: str | None, top_k: int, classes: list[str] | None = None) -> None:
    """Rank 0: write to a temporary file, then rename, so no reader sees half a file."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".pt":
        torch.save({"index": torch.arange(len(outputs)), "outputs": outputs}, tmp)
    else:
        header, rows = csv_rows(outputs, kind, top_k, classes)
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    os.replace(tmp, path)


def csv_rows(outputs: Any, kind: str | None, top_k: int,
             names: list[str] | None = None) -> tuple[list[str], list[list]]:
    """Classification: top-k classes (by name where the data set has names) with probabilities;
    otherwise the raw values."""
    from ..data import CLASSIFICATION

    if kind == CLASSIFICATION:
        k = min(top_k, outputs.shape[1])
        probs, classes = outputs.softmax(dim=1).topk(k, dim=1)
        label = (lambda c: names[c]) if names else (lambda c: c)
        header = ["index", "predicted"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")]
        rows = [[i, label(cs[0])] + [v for pair in zip(map(label, cs), (f"{p:.6f}" for p in ps)) for v in pair]
                for i, (cs, ps) in enumerate(zip(classes.tolist(), probs.tolist()))]
        return header, rows
    values = outputs.reshape(len(outputs), -1)
    header = ["index"] + (["value"] if values.shape[1] == 1 else [f"value_{j}" for j in range(values.shape[1])])
    return header, [[i] + [f"{v:.6g}" for v in row] for i, row in enumerate(values.tolist())]
