"""The `ddp-train` command line. Importing this module must stay fast: no torch at import time."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import traceback
from typing import Annotated, Any, Optional, cast

import typer

from . import __version__
from .config import ALIASES, FIELDS, build_config, field_types, option_name
from .distenv import rank_of
from .errors import AgreedError, Interrupted, PeerFailure, Preempted, RankError, UsageError

def _fit(config: Optional[str] = None, **options: Any) -> int:
    options["task_args"] = parse_task_args(options.get("task_args"))
    cfg = build_config(options, config)
    from .api import fit  # only now: --help must not pay for torch

    try:
        return fit(cfg=cfg).exit_code
    except Preempted as e:
        if rank_of(os.environ) == 0:
            print(f"preempted at step {e.result.step}: the checkpoint is saved. To continue, run the same command "
                  f"again, or: {continue_command(e.result.run_dir)}", file=sys.stderr, flush=True)
        return e.exit_code
    except Interrupted as e:  # its one line is printed: `interrupted at step N; saved ...`
        return e.exit_code


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


# `fit --help` shows the options under these headings, in this order (FitConfig field -> heading).
# A field missing here still shows, under "Other" (with --config and --help).
FIT_GROUPS: dict[str, str] = {
    **dict.fromkeys(("task", "task_args"), "Your own Task"),
    **dict.fromkeys(("data", "data_dir", "download", "samples", "val_samples", "input_shape", "classes",
                     "image_size", "augment", "workers", "data_on_device"), "Data"),
    **dict.fromkeys(("model", "hidden", "pretrained", "compile", "channels_last"), "Model"),
    **dict.fromkeys(("epochs", "max_steps", "batch_size", "global_batch_size", "eval_batch_size", "grad_accum", "optimizer", "lr",
                     "momentum", "weight_decay", "scheduler", "lr_step_epochs", "lr_gamma", "warmup_steps",
                     "label_smoothing", "clip_grad_norm", "precision", "tf32", "seed", "deterministic", "skip_nonfinite",
                     "max_skipped"), "Optimisation"),
    **dict.fromkeys(("eval_every", "metrics", "monitor", "mode", "patience"), "Evaluation and early stopping"),
    **dict.fromkeys(("strategy", "backend", "timeout", "hang_timeout"), "Distributed"),
    **dict.fromkeys(("run_dir", "resume", "overwrite", "init_from", "init_strict", "save_every", "save_every_seconds",
                     "keep", "preempt_signal", "requeue"), "Checkpoints and resume"),
    **dict.fromkeys(("log_every", "log_all_ranks", "progress", "wandb", "wandb_project", "wandb_name", "tensorboard",
                     "debug"), "Output and logging"),
}
OTHER = "Other"


class FitOption(typer.core.TyperOption):
    """A fit option converted by its FitConfig field's type. typer (0.29) converts every option
    through a pydantic TypeAdapter, and importing pydantic for that costs ~0.15 s of every launch;
    fit's options are str, int, float and bool flags, which need no more than this."""

    def process_value(self, ctx, value: Any) -> Any:
        if isinstance(value, str) and self.name in FIELDS:
            value = _convert(value, field_types(self.name), self, ctx)
        if self.callback is not None:
            value = self.callback(ctx, self, value)
        return value


def _convert(text: str, types: tuple[type, ...], param: FitOption, ctx) -> Any:
    kinds = [kind for kind in (int, float) if kind in types]
    for kind in kinds:
        try:
            return kind(text)
        except ValueError:
            pass
    if kinds:
        name = "an integer" if kinds == [int] else "a number"
        raise typer.BadParameter(f"{text!r} is not {name}.", ctx=ctx, param=param)
    return text


class _FitOptions:
    """Makes a command's options (--help included) FitOptions. A mixin before typer's command classes."""

    params: list[Any]  # click's Command's

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _as_fit_option(param)

    def get_help_option(self, ctx: Any) -> Any:
        return _as_fit_option(super().get_help_option(ctx))  # type: ignore[misc]  # click's Command, after the mixin


def _as_fit_option(param: Any) -> Any:
    if type(param) is typer.core.TyperOption:
        param.__class__ = FitOption
    return param


class RootGroup(_FitOptions, typer.core.TyperGroup):
    """`ddp-train`: --help and --version without pydantic (the tools' own options keep typer's)."""


class GroupedCommand(_FitOptions, typer.core.TyperCommand):
    """fit: its options converted by FitOption, its help listing them under FIT_GROUPS' headings
    (click's plain formatter: rich would cost ~0.2 s per --help)."""

    def format_options(self, ctx, formatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {g: [] for g in [*dict.fromkeys(FIT_GROUPS.values()), OTHER]}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups[FIT_GROUPS.get(param.name, OTHER)].append(record)
        for heading, records in groups.items():
            if records:
                with formatter.section(heading):
                    formatter.write_dl(records)


app = typer.Typer(cls=RootGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})

FIT_HELP = """Train a model: one process on CPU, or one process per GPU under torchrun or srun.

\b
Examples:
  ddp-train fit                                # digits + MLP on the CPU, seconds
  torchrun --standalone --nproc_per_node=2 -m ddp_train fit --epochs 3
  ddp-train fit --data synthetic --model cnn --input-shape 1,28,28 --max-steps 200
  ddp-train fit --config run.toml --lr 3e-4    # flags override the file
"""


def _print_version(value: bool) -> None:
    if value:
        print(f"ddp-train {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", is_eager=True, callback=_print_version)] = False) -> None:
    """Train PyTorch models on a laptop CPU, one GPU, many GPUs or many Slurm nodes with the same command."""


def _option(field: dataclasses.Field) -> inspect.Parameter:
    meta, default = field.metadata, field.default
    if field.name == "task_args":
        option = typer.Option(meta["flag"], help=meta["help"], show_default=False, metavar="KEY=VALUE")
        return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[Optional[list[str]], option])
    help_text = meta["help"]
    base = {"bool": bool, "int": int, "float": float}.get(str(field.type).split(" ")[0], str)
    flag = option_name(field.name)
    decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
    if default is not None and base is not bool:
        help_text += f" [default: {default}]"
    metavar = f"[{'|'.join(meta['choices'])}]" if meta["choices"] else None  # e.g. --optimizer [sgd|adam|adamw]
    option = typer.Option(*decls, help=help_text, show_default=False, metavar=metavar)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[base], option])


def _fit_signature() -> inspect.Signature:
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--config", help="TOML file with any of these options (flags override).")])
    return inspect.Signature([config] + [_option(f) for f in FIELDS.values()], return_annotation=int)


# The options are FitConfig's fields: one source of truth. (typeshed's functions lack __signature__.)
_fit.__signature__ = _fit_signature()  # type: ignore[attr-defined]
app.command("fit", help=FIT_HELP, cls=GroupedCommand)(_fit)


def _register_tools() -> None:
    from . import tools

    for name, fn in tools.COMMANDS.items():
        app.command(name, help=fn.__doc__)(fn)


_register_tools()


def _usage_message(e: Any) -> str:
    """click's message; for an unknown option that other tools spell that way (`--learning-rate`),
    ours (`--lr`), which click's close-match search misses."""
    option, ctx = getattr(e, "option_name", None), getattr(e, "ctx", None)
    if type(e).__name__ == "NoSuchOption" and option and ctx is not None:
        key = option.lstrip("-").replace("-", "_").lower()
        key = key if key in FIELDS else ALIASES.get(key)  # --LR, --learning-rate: --lr
        flags = {o for param in ctx.command.params for o in (*param.opts, *param.secondary_opts)}
        if key and option_name(key) in flags:
            return f"{e.message} (did you mean {option_name(key)}?)"
    return e.format_message()


# click's UsageError: newer typer vendors its own click, and exports only BadParameter of its errors.
_CLICK_USAGE_ERROR = cast("type[Exception]", typer.BadParameter.__base__)


def _command_path(e: Exception, argv: list[str]) -> str:
    """The command whose --help answers the error; an option used without its value (or a flag
    given one) comes without a context, so the command is read from argv."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        return ctx.command_path
    commands = {info.name for info in app.registered_commands}
    return f"ddp-train {argv[0]}" if argv[0] in commands else "ddp-train"


def main(argv: list[str] | None = None) -> None:
    """The console script. With `argv` (tests, embedding) it ends in SystemExit as usual; as the
    process's own entry point it skips the interpreter's teardown after a job (see exit_process)."""
    entry_point = argv is None
    argv = (sys.argv[1:] if argv is None else argv) or ["--help"]  # bare `ddp-train`: help, exit 0, no error
    rank = rank_of(os.environ)
    debug = "--debug" in argv

    def say(message: str) -> None:
        if rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)

    try:
        code = app(args=argv, prog_name="ddp-train", standalone_mode=False)
    except _CLICK_USAGE_ERROR as e:
        say(f"{_usage_message(e)} (see `{_command_path(e, argv)} --help`)")
        code = 2
    except typer.Abort:
        code = 130
    except AgreedError as e:
        if not e.reported:
            details = getattr(e, "details", "")  # UserCodeError's frames
            if debug and rank == 0:
                traceback.print_exc()
            elif details and rank == 0:
                print(details, end="", file=sys.stderr)
            say(str(e))
        code = e.exit_code
    except RankError as e:
        if debug:
            traceback.print_exc()
        elif e.details:
            print(e.details, end="", file=sys.stderr)
        print(f"error: [rank {rank}] {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except PeerFailure as e:
        print(f"error: [rank {rank}] stopping: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception:
        print(f"error: [rank {rank}] crashed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    code = code if isinstance(code, int) else 0
    if entry_point and "ddp_train.dist" in sys.modules:  # a job ran (fit, evaluate, predict)
        from .dist import exit_process

        exit_process(code)
    sys.exit(code)
