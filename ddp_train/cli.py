"""The `ddp-train` command line. Importing this module must stay fast: no torch at import time."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import traceback
from typing import Annotated, Any, Optional

import click
import typer

from .config import FIELDS, build_config, option_name
from .distenv import DistEnv, rank_of
from .errors import AgreedError, PeerFailure, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})

FIT_HELP = """Train a model: one process on CPU, or one process per GPU under torchrun or srun.

\b
Examples:
  ddp-train fit                                # digits + MLP on the CPU, seconds
  torchrun --standalone --nproc_per_node=2 -m ddp_train fit --epochs 3
  ddp-train fit --data synthetic --model cnn --input-shape 1,28,28 --max-steps 200
  ddp-train fit --config run.toml --lr 3e-4    # flags override the file
"""


@app.callback()
def _root() -> None:
    """Train PyTorch models on a laptop CPU, one GPU, many GPUs or many Slurm nodes with the same command."""


def _fit(config: Optional[str] = None, **options: Any) -> int:
    options["task_args"] = parse_task_args(options.get("task_args"))
    cfg = build_config(options, config)
    from .api import fit  # only now: --help must not pay for torch

    result = fit(cfg=cfg)
    if result.status == "preempted" and rank_of(os.environ) == 0:
        print(f"preempted at step {result.step}: the checkpoint is saved. To continue, run the same command "
              f"again, or: {continue_command(result.run_dir)}", file=sys.stderr, flush=True)
    return result.exit_code


def parse_task_args(pairs: list[str] | None) -> dict[str, Any] | None:
    """--task-arg KEY=VALUE (repeated) -> {KEY: VALUE}; values are Python literals where they parse."""
    if not pairs:
        return None
    import ast

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--task-arg {pair!r}: write it as KEY=VALUE, e.g. --task-arg n_layer=4")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def continue_command(run_dir: str) -> str:
    """The shortest command that continues `run_dir` under this launch."""
    env = os.environ
    if "SLURM_JOB_ID" in env and "TORCHELASTIC_RUN_ID" not in env:
        return f"sbatch the same script (with --requeue it requeues itself); run dir {run_dir}"
    if "TORCHELASTIC_RUN_ID" in env:
        nproc = env.get("LOCAL_WORLD_SIZE", "1")
        return f"torchrun --standalone --nproc_per_node={nproc} -m ddp_train fit --run-dir {run_dir}"
    return f"ddp-train fit --run-dir {run_dir}"


def _option(field: dataclasses.Field) -> inspect.Parameter:
    meta, default = field.metadata, field.default
    if field.name == "task_args":
        option = typer.Option(meta["flag"], help=meta["help"], show_default=False, metavar="KEY=VALUE")
        return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[Optional[list[str]], option])
    help_text = meta["help"] + (f" [{'|'.join(meta['choices'])}]" if meta["choices"] else "")
    base = {"bool": bool, "int": int, "float": float}.get(str(field.type).split(" ")[0], str)
    flag = option_name(field.name)
    decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
    if default is not None and base is not bool:
        help_text += f" [default: {default}]"
    option = typer.Option(*decls, help=help_text, show_default=False)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[base], option])


def _fit_signature() -> inspect.Signature:
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--config", help="TOML file with any of these options (flags override).")])
    return inspect.Signature([config] + [_option(f) for f in FIELDS.values()], return_annotation=int)


_fit.__signature__ = _fit_signature()  # the options are FitConfig's fields: one source of truth
app.command("fit", help=FIT_HELP)(_fit)


def _register_tools() -> None:
    from . import tools

    for name, fn in tools.COMMANDS.items():
        app.command(name, help=fn.__doc__)(fn)


_register_tools()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rank = rank_of(os.environ)
    debug = "--debug" in argv

    def say(message: str) -> None:
        if rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)

    try:
        code = app(args=argv, prog_name="ddp-train", standalone_mode=False)
    except (click.exceptions.UsageError, typer.BadParameter.__base__) as e:  # typer vendors its own click
        command = e.ctx.command_path if e.ctx else "ddp-train"
        say(f"{e.format_message()} (see `{command} --help`)")
        code = 2
    except (click.exceptions.Abort, typer.Abort):
        code = 130
    except AgreedError as e:
        if not e.reported:
            if debug and rank == 0:
                traceback.print_exc()
            elif getattr(e, "details", "") and rank == 0:
                print(e.details, end="", file=sys.stderr)
            say(str(e))
        code = e.exit_code
    except PeerFailure as e:
        print(f"error: [rank {rank}] stopping: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception:
        print(f"error: [rank {rank}] crashed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
