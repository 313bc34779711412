"""`ddp-train export`: any of our checkpoints (a file, or a sharded FSDP directory) -> the bare
module's plain state dict, loadable with load_state_dict(strict=True) into the unwrapped model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SOURCE = typer.Argument(metavar="SOURCE", help="A run directory (its newest checkpoint, or --best), or a checkpoint: a .pt "
                        "file or a sharded checkpoint directory.", show_default=False)


def export(
    source: Annotated[str, SOURCE],
    output: Annotated[str, typer.Option("--output", "-o", help="The .pt file to write.", show_default=False)],
    best: Annotated[bool, typer.Option("--best", help="From a run directory: its best checkpoint, not the "
                                       "newest.")] = False,
) -> None:
    """Write a checkpoint's model weights as a plain state dict, in one process.

    Sharded (--strategy fsdp) checkpoints are gathered here, without a process group. The keys
    are the bare module's (no `module.` or `_orig_mod.` prefixes).

    Examples:

      ddp-train export runs/x --output model.pt

      ddp-train export runs/x/checkpoints/step-00001200 -o model.pt   # a sharded checkpoint

      python -c "import torch; m = build(); m.load_state_dict(torch.load('model.pt'))"
    """
    from .. import checkpoint
    from ..errors import UsageError

    path = Path(source)
    if (path / "checkpoints").is_dir():
        path = _pick(path / "checkpoints", best)
    state, ckpt = checkpoint.read(path, "export another checkpoint (RUN_DIR/checkpoints/step-*)")
    out = Path(output)
    if out.suffix != ".pt":
        raise UsageError(f"--output {output}: write a .pt file")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_save(dict(state), out)
    step = f", step {ckpt['step']}" if ckpt and "step" in ckpt else ""
    typer.echo(f"wrote {len(state)} tensors ({sum(t.numel() for t in state.values()):,} values) from {path}{step} "
               f"to {out}", err=True)


def _pick(ckpt_dir: Path, best: bool) -> Path:
    from .. import checkpoint
    from ..errors import UsageError

    if best:
        for candidate in (ckpt_dir / "best.pt", ckpt_dir / "best"):
            if candidate.exists():
                return candidate
        raise UsageError(f"{ckpt_dir} has no best checkpoint yet; drop --best for the newest one")
    latest = checkpoint.latest(ckpt_dir, sharded=True) or checkpoint.latest(ckpt_dir)
    if latest is None:
        raise UsageError(f"{ckpt_dir} holds no complete checkpoint")
    return latest
