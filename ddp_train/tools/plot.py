"""`ddp-train plot`: history.csv -> history.png (loss and each validation metric per epoch)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError

INSTALL = "pip install 'ddp-train[plot]'"


def plot(
    run_dir: Annotated[str, typer.Argument(help="Run directory holding history.csv.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="PNG to write "
                                                  "(default: RUN_DIR/history.png).")] = None,
) -> None:
    """Plot a run's loss (train vs val) and validation metrics per epoch into history.png.

    Needs matplotlib: pip install 'ddp-train[plot]'.

    Examples:

      ddp-train plot runs/digits-mlp-20240101-120000

      ddp-train plot runs/x --output report/curves.png
    """
    history = Path(run_dir) / "history.csv"
    if not history.is_file():
        raise UsageError(f"{history} does not exist; pass a run directory that `ddp-train fit` wrote "
                         "(it has history.csv once an epoch has finished)")
    columns = read_history(history)
    if not columns.get("epoch"):
        raise UsageError(f"{history} has no epoch rows yet; plot again after the first epoch")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UsageError(f"plot needs matplotlib, which is not installed: {INSTALL}") from None

    metrics = [c for c in columns if c.startswith("val_") and c != "val_loss"]
    panels = 1 + len(metrics)
    fig = Figure(figsize=(5 * min(panels, 3), 3.6 * math.ceil(panels / 3)), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no global pyplot state
    axes = fig.subplots(math.ceil(panels / 3), min(panels, 3), squeeze=False).ravel()
    epochs = columns["epoch"]
    for name in ("train_loss", "val_loss"):
        if name in columns:
            axes[0].plot(epochs, columns[name], marker="o", label=name.split("_")[0])
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    for ax, name in zip(axes[1:], metrics):
        ax.plot(epochs, columns[name], marker="o", color="tab:green")
        ax.set(title=name, xlabel="epoch")
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(Path(run_dir).resolve().name)
    target = Path(output) if output else Path(run_dir) / "history.png"
    try:
        fig.savefig(target, dpi=110)
    except OSError as e:
        raise UsageError(f"cannot write {target} ({e.strerror}); pass a writable --output") from None
    typer.echo(f"wrote {target}")


def read_history(path: Path) -> dict[str, list[float]]:
    """Columns of history.csv as floats (empty cells become NaN, so gaps show as gaps)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out: dict[str, list[float]] = {}
    for name in rows[0]:
        try:
            out[name] = [float(r[name]) if r[name] not in ("", None) else math.nan for r in rows]
        except ValueError:
            raise UsageError(f"{path}: column {name} holds a non-number; is this a ddp_train history.csv?") from None
    return out
