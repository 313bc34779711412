"""`FitConfig`: the frozen, validated configuration of one `fit` (no torch import here)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Optional

from .errors import UsageError
from .safeio import refuse_link, replace_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib


def opt(default: Any, help: str, *, min: float | None = None, choices: tuple[str, ...] = (),
        flag: str | None = None, positive: bool = False, max: float | None = None) -> Any:
    """A config field that also describes its command-line option."""
    meta = {"help": help, "min": min, "choices": choices, "flag": flag, "positive": positive, "max": max}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FitConfig:
    """The settings of one `fit`: frozen, validated when built, saved as the run's config.json.

    Each field is an option of `ddp-train fit` (`batch_size` is --batch-size) and a keyword of
    `fit()`. Its help text is written once, on the field (`opt(default, help)`): it is the option's
    line in `ddp-train fit --help` and the field's line under Attributes below, which is generated
    from the fields when this module is imported.

    Raises:
        UsageError: a value outside its range or choices, or options that contradict each other
            (--task with --data or --model, --task-arg without --task).

    Example::

        from ddp_train import FitConfig, fit

        cfg = FitConfig(epochs=3, batch_size=32, run_dir="runs/small")
        fit(cfg=cfg)                       # the built-in task (--data digits)
        fit(cfg=cfg.replace(lr=3e-4))      # a new, validated config

    Attributes:
    """

    # the user's own training job
    task: str | None = opt(None, "Your Task class, package.module:Class or path/to/file.py:Class (instead of "
                           "--data/--model).")
    task_args: Optional[dict] = opt(None, "A setting of --task's constructor, KEY=VALUE (repeat the option); "
                                    "values are read as Python literals, else as strings.", flag="--task-arg")
    # data
    data: str = opt("digits", "Data set: digits, synthetic, linreg, mnist, fashion-mnist, cifar10, "
                    "imagefolder, or package.module:function.")
    data_dir: str | None = opt(None, "Folder of file-based data sets (mnist, cifar10, imagefolder).")
    download: bool = opt(False, "Download torchvision data sets into --data-dir (rank 0 only).")
    samples: int = opt(4096, "Training samples of --data synthetic/linreg.", min=1)
    val_samples: int = opt(1000, "Validation samples of --data synthetic/linreg.", min=1)
    input_shape: str = opt("1,28,28", "Sample shape C,H,W (or F) of --data synthetic.")
    classes: int = opt(10, "Classes of --data synthetic.", min=2)
    image_size: int | None = opt(None, "Image side in pixels for --data imagefolder (default 224).", min=8)
    augment: bool | None = opt(None, "Random training augmentation, seeded by (seed, epoch, sample): random "
                               "resized crop + flip for imagefolder (default on), padded crop (+ flip) for "
                               "cifar10/mnist/fashion-mnist and image-shaped synthetic data (default off).")
    # model
    model: str | None = opt(None, "Model: mlp, cnn, linear, a torchvision model name, or "
                            "package.module:function. Default: the data set's own.")
    hidden: str = opt("128,64", "Hidden layer widths of --model mlp.")
    pretrained: bool = opt(False, "Start a torchvision model from its pretrained weights (from the local "
                           "torch hub cache; the last layer is replaced when the classes differ).")
    # optimisation
    epochs: int = opt(10, "Epochs to train.", min=1)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", min=1)
    batch_size: int = opt(64, "Batch size PER RANK: the global batch is this x world size x grad-accum "
                          "(with --global-batch-size: the largest micro-batch per rank).", min=1)
    global_batch_size: int | None = opt(None, "Fix the global batch: each rank takes this / world size, in "
                                        "micro-batches of at most --batch-size; a run may then resume on another "
                                        "number of processes and continue the same trajectory.", min=1)
    eval_batch_size: int | None = opt(None, "Evaluation batch size per rank (default: --batch-size, the training micro-batch).", min=1)
    lr: float = opt(1e-3, "Learning rate.", positive=True)
    optimizer: str = opt("adam", "Optimizer.", choices=("sgd", "adam", "adamw"))
    momentum: float = opt(0.9, "SGD momentum.", min=0, max=1)
    weight_decay: float = opt(0.0, "Weight decay.", min=0)
    scheduler: str = opt("none", "LR schedule, stepped every optimizer step (linear: decay to 0, after any "
                         "--warmup-steps, as Hugging Face Trainer's default).",
                         choices=("none", "cosine", "linear", "step", "onecycle"))
    lr_step_epochs: int = opt(30, "--scheduler step: epochs between decays.", min=1)
    lr_gamma: float = opt(0.1, "--scheduler step: decay factor.", positive=True)
    warmup_steps: int = opt(0, "Linear learning-rate warm-up over this many steps, before any --scheduler.", min=0)
    label_smoothing: float = opt(0.0, "Label smoothing of the built-in classification loss.", min=0, max=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step (no all-reduce on the others).", min=1)
    clip_grad_norm: float | None = opt(None, "Clip the global gradient norm to this value.", positive=True)
    precision: str = opt("32", "Numeric precision (autocast; fp16 adds a GradScaler).",
                         choices=("32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the model.")
    channels_last: bool = opt(False, "Use channels_last memory format (CUDA convnets).")
    data_on_device: bool = opt(False, "Move in-memory data sets to the device once (no copy per step).")
    seed: int = opt(0, "Random seed of the weights, data order and augmentation. Every rank gets the same "
                    "seed, so dropout draws the same masks on every rank (each on its own samples).", min=0)
    deterministic: bool = opt(False, "Use deterministic algorithms only, no TF32, no cuDNN autotuning (slower on "
                              "GPU; on GPU, bit-exact repeats and resumes need it).")
    tf32: bool = opt(True, "On CUDA: TF32 for float32 matmuls and convolutions and cuDNN autotuning "
                     "(cudnn.benchmark); --no-tf32 computes in full float32. Off under --deterministic.")
    skip_nonfinite: bool = opt(False, "Skip optimizer steps whose gradients are NaN/inf instead of stopping.")
    max_skipped: int = opt(10, "With --skip-nonfinite: stop after this many skipped steps in a row.", min=1)
    # evaluation, early stopping and best checkpoint
    eval_every: int | None = opt(None, "Evaluate every this many steps instead of every epoch (a checkpoint "
                                 "follows as --save-every-seconds allows).", min=1)
    metrics: str | None = opt(None, "Extra validation metrics from torchmetrics, comma-separated: auroc, ap, "
                              "top3, top5, precision, recall (classification); explained_variance, mape "
                              "(regression).")
    monitor: str = opt("val_loss", "Metric that picks best.pt and drives early stopping.")
    mode: str = opt("auto", "Whether --monitor should go down or up (auto: from its name).",
                    choices=("auto", "min", "max"))
    patience: int | None = opt(None, "Stop after this many evaluations without improvement.", min=1)
    # distributed
    strategy: str = opt("auto", "auto: DDP if several processes, DataParallel if one process sees "
                        "several GPUs, else one device; fsdp: parameters, gradients and optimizer state "
                        "sharded over the ranks (FSDP2), sharded checkpoints.",
                        choices=("auto", "ddp", "dp", "single", "fsdp"))
    backend: str = opt("auto", "Process-group backend (auto: nccl on CUDA, gloo otherwise).",
                       choices=("auto", "nccl", "gloo"))
    workers: int | None = opt(None, "DataLoader worker processes per rank (default: none, except --data imagefolder "
                              "on GPU: up to 8, from the CPUs of each process, to decode JPEGs off the training "
                              "process).", min=0)
    timeout: float = opt(600.0, "Seconds a collective may wait before the run is declared hung.", positive=True)
    hang_timeout: float = opt(45.0, "Seconds a rank may go without a heartbeat (alive but stopped or stuck) "
                              "before every rank stops, naming it, instead of waiting --timeout (0: never).", min=0)
    # run directory, checkpoints, resume
    run_dir: str | None = opt(None, "Run directory (default: runs/<data>-<model>-<launch id>).")
    resume: str = opt("auto", "auto: continue from the run directory's checkpoint if any; never: start "
                      "fresh; or a checkpoint PATH.")
    overwrite: bool = opt(False, "With --resume never: replace an existing run directory's contents.")
    init_from: str | None = opt(None, "Load model weights only from this checkpoint or state dict.")
    init_strict: bool = opt(True, "With --init-from: require every key to match.")
    save_every: int | None = opt(None, "Also write checkpoints/step-NNNNNNNN.pt every this many steps.", min=1)
    keep: int = opt(3, "How many step-*.pt checkpoints to keep.", min=1)
    save_every_seconds: float = opt(60.0, "Write an evaluation's checkpoint only when this many seconds have "
                                    "passed since the previous write (0: at every evaluation). The end of the "
                                    "run, preemption and --save-every always write.", min=0)
    preempt_signal: str | None = opt(None, "Extra signal that means 'save and stop' (SIGTERM always does).",
                                     choices=("USR1", "USR2"))
    requeue: bool = opt(False, "Under Slurm, requeue the job after a preemption checkpoint.")
    # logging
    log_every: int = opt(50, "Log (and sync the loss) every this many steps.", min=1)
    log_all_ranks: bool = opt(False, "Print from every rank, prefixed [rank N] (debugging).")
    progress: bool = opt(True, "Progress bar on rank 0 when attached to a terminal.")
    wandb: bool = opt(False, "Log to Weights & Biases from rank 0 (WANDB_MODE=offline works).")
    wandb_project: str = opt("ddp-train", "wandb project.")
    wandb_name: str | None = opt(None, "wandb run name (default: the run directory's name).")
    tensorboard: bool = opt(False, "Write TensorBoard event files to <run dir>/tensorboard from rank 0 (needs the "
                            "tensorboard package: pip install 'ddp-train[tensorboard]').")
    debug: bool = opt(False, "Show tracebacks for usage errors.")

    def __post_init__(self) -> None:
        if self.task and (self.data != "digits" or self.model is not None):
            raise UsageError("--task brings its own data and model: drop --data/--model, or drop --task")
        if self.task_args and not self.task:
            raise UsageError("--task-arg sets a setting of --task's class: pass --task too")
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            name = option_name(f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number (got {value})")
            if meta.get("max") is not None and value > meta["max"]:
                raise UsageError(f"{name} must be <= {meta['max']} (got {value})")
            if meta.get("min") is not None and value < meta["min"]:
                raise UsageError(f"{name} must be >= {meta['min']} (got {value})")
            if meta.get("positive") and not value > 0:
                raise UsageError(f"{name} must be > 0 (got {value})")
            if meta.get("choices") and value not in meta["choices"]:
                raise UsageError(f"{name} must be one of {', '.join(meta['choices'])} (got {value!r})")
        parse_shape(self.input_shape, "--input-shape")
        parse_shape(self.hidden, "--hidden")
        if self.resume not in ("auto", "never") and not self.resume:
            raise UsageError("--resume must be auto, never or a checkpoint path")

    def monitor_mode(self) -> str:
        """"min" or "max": whether a lower --monitor is better (--mode auto: max for accuracy, F1, R2)."""
        if self.mode != "auto":
            return self.mode
        return "max" if any(k in self.monitor for k in ("acc", "f1", "r2")) else "min"

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as config.json records them."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FitConfig":
        """A copy with `changes` applied, validated again (UsageError when a value is refused)."""
        return dataclasses.replace(self, **changes)


def option_name(key: str) -> str:
    field_ = FIELDS.get(key)
    return (field_ and field_.metadata.get("flag")) or "--" + key.replace("_", "-")


def parse_shape(text: str, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        example = "128,64" if what == "--hidden" else "1,28,28"
        raise UsageError(f"{what} must be comma-separated integers like {example} (got {text!r})") from None
    if not shape or any(s < 1 for s in shape):
        if what == "--hidden":
            raise UsageError(f"{what} must be positive integers like 128,64 (got {text!r})")
        raise UsageError(f"{what} must be positive integers like 1,28,28 (got {text!r})")
    return shape


FIELDS = {f.name: f for f in dataclasses.fields(FitConfig)}


def _attribute_lines() -> str:
    """FitConfig's Attributes section: each field's option, default and --help text."""
    return "\n".join(textwrap.fill(f"{name} ({option_name(name)}, default {f.default!r}): {f.metadata['help']}",
                                   width=100, initial_indent=" " * 8, subsequent_indent=" " * 12,
                                   break_on_hyphens=False, break_long_words=False)
                     for name, f in FIELDS.items()) + "\n"


FitConfig.__doc__ = (FitConfig.__doc__ or "").rstrip(" ") + _attribute_lines()

# Settings that may differ when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = frozenset({
    "epochs", "max_steps", "patience", "workers", "timeout", "hang_timeout", "run_dir", "resume", "overwrite",
    "save_every", "save_every_seconds", "keep", "preempt_signal", "requeue", "log_every", "log_all_ranks",
    "progress", "wandb", "wandb_project", "wandb_name", "tensorboard", "debug", "data_dir", "download", "eval_batch_size",
    "init_from", "init_strict", "compile", "eval_every", "metrics", "max_skipped", "tf32",
})


# What other tools (Hugging Face Trainer, Lightning, torch examples, timm) call our options:
# an unknown key or flag with one of these names is answered with ours.
ALIASES = {
    **dict.fromkeys(("learning_rate", "base_lr", "lr0"), "lr"),
    **dict.fromkeys(("lr_scheduler", "lr_scheduler_type", "scheduler_type", "sched"), "scheduler"),
    **dict.fromkeys(("num_epochs", "max_epochs", "n_epochs", "num_train_epochs", "epoch"), "epochs"),
    **dict.fromkeys(("max_iters", "max_iterations", "num_steps", "max_train_steps", "total_steps"), "max_steps"),
    **dict.fromkeys(("num_workers", "dataloader_num_workers", "n_workers", "workers_per_gpu"), "workers"),
    **dict.fromkeys(("gradient_accumulation_steps", "accumulate_grad_batches", "accumulation_steps",
                     "grad_accumulation"), "grad_accum"),
    **dict.fromkeys(("batch", "bs", "train_batch_size", "per_device_train_batch_size", "micro_batch_size"),
                    "batch_size"),
    **dict.fromkeys(("per_device_eval_batch_size", "val_batch_size", "test_batch_size"), "eval_batch_size"),
    **dict.fromkeys(("max_grad_norm", "gradient_clip_val", "grad_clip", "clip_grad"), "clip_grad_norm"),
    **dict.fromkeys(("optim", "opt"), "optimizer"),
    "wd": "weight_decay",
    **dict.fromkeys(("dataset", "dataset_name"), "data"),
    **dict.fromkeys(("data_path", "data_root", "dataset_dir", "root"), "data_dir"),
    **dict.fromkeys(("arch", "architecture", "net", "network"), "model"),
    **dict.fromkeys(("num_classes", "n_classes"), "classes"),
    **dict.fromkeys(("hidden_sizes", "hidden_dims", "hidden_size"), "hidden"),
    **dict.fromkeys(("output_dir", "out_dir", "save_dir", "checkpoint_dir", "ckpt_dir", "default_root_dir"),
                    "run_dir"),
    **dict.fromkeys(("resume_from_checkpoint", "resume_from", "ckpt_path"), "resume"),
    **dict.fromkeys(("save_steps", "save_interval", "checkpoint_every"), "save_every"),
    "save_total_limit": "keep",
    **dict.fromkeys(("logging_steps", "log_interval", "log_every_n_steps"), "log_every"),
    "early_stopping_patience": "patience",
    "metric_for_best_model": "monitor",
    "dist_backend": "backend",
    **dict.fromkeys(("mixed_precision", "amp", "fp16", "bf16", "dtype"), "precision"),
    **dict.fromkeys(("random_seed", "manual_seed"), "seed"),
    "gamma": "lr_gamma",
    "step_size": "lr_step_epochs",
    "torch_compile": "compile",
    **dict.fromkeys(("use_wandb", "report_to"), "wandb"),
    "run_name": "wandb_name",
}


def suggest(name: str) -> str | None:
    """The fit option (field name) an unknown key or flag most likely means, or None."""
    key = name.lstrip("-").replace("-", "_").lower()
    if key in ALIASES:
        return ALIASES[key]
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return close[0] if close else None


def check_types(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Reject unknown keys and wrongly typed values (from TOML or a checkpoint)."""
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in FIELDS:
            close = suggest(key)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise UsageError(f"{source}: unknown key {key!r}{hint}; valid keys are the fit options")
        expected = field_types(key)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if value is not None and not ok:
            if float in expected and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                names = "/".join(t.__name__ for t in expected if t is not type(None))
                raise UsageError(f"{source}: {key} must be {names} (got {value!r})")
        out[key] = value
    return out


def field_types(key: str) -> tuple[type, ...]:
    annotation = str(FIELDS[key].type)
    types = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None), "dict": dict}
    annotation = annotation.replace(" ", "").replace("Optional[dict]", "dict|None")
    return tuple(t for name, t in types.items() if name in annotation.split("|"))


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    if isinstance(raw.get("fit"), dict):
        raw = raw["fit"]
    return check_types(raw, str(path))


# Per invocation: never taken from a run directory's saved settings.
PER_INVOCATION = frozenset({"run_dir", "resume", "overwrite", "init_from", "init_strict", "debug"})

# How a run is invoked or shown, not which run it is: left out of its identity.
NOT_IDENTITY = frozenset({"run_dir", "resume", "overwrite", "debug", "progress", "log_all_ranks", "tensorboard"})


def run_identity(cfg: FitConfig, world_size: int) -> dict[str, Any]:
    """What defines a run, for its default directory's name: the settings that differ from their
    defaults (an option added later with a default leaves existing names alone) and the number of
    processes, unless --global-batch-size makes the run independent of it."""
    identity = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in NOT_IDENTITY and getattr(cfg, f.name) != f.default}
    if not cfg.global_batch_size:
        identity["world_size"] = world_size
    if cfg.task:
        identity["task"] = task_identity(cfg.task)
    return identity


def task_identity(spec: str) -> str:
    """Which Task a --task names, wherever it lives: `module.Class` for `path/to/module.py:Class`
    (relative, absolute, a moved checkout or a per-job copy of the code alike) and for
    `pkg.module:Class`. A run is compared on resume by this and the Task's settings, not by path."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = PurePath(where)
        module = path.parent.name if path.stem == "__init__" else path.stem
    else:
        module = where.rpartition(".")[2]
    return f"{module}.{name}"


def build_config(cli_values: dict[str, Any], config_file: str | None = None, *, own_task: bool = False) -> FitConfig:
    """Defaults < the run directory's saved settings (when continuing it) < TOML file < flags
    (flags given as None were not set). So `fit --run-dir runs/x` alone continues runs/x as it was.
    Code the saved settings name (--task, --data or --model package.module:function) is taken
    only when the caller names it too (or brings its own Task: `own_task`)."""
    given = load_toml(config_file) if config_file else {}
    given.update({k: v for k, v in cli_values.items() if v is not None})
    saved = saved_settings(given.get("run_dir"), given.get("resume", "auto"))
    unnamed = [] if own_task else [(k, spec) for k, spec in named_code(saved) if k not in given]
    if unnamed:
        path = Path(given["run_dir"]) / "config.json"
        options = " ".join(f"{option_name(k)} {spec}" for k, spec in unnamed)
        raise UsageError(f"{path} names code to run ({options}); a run directory's code runs only when you "
                         f"name it: after reading that code, repeat {options}")
    return FitConfig(**{**saved, **given})


def named_code(values: dict[str, Any]) -> list[tuple[str, str]]:
    """The user code that settings name: a Task class, a data or model function (`module:name`)."""
    code = [("task", values["task"])] if values.get("task") else []
    return code + [(k, values[k]) for k in ("data", "model") if isinstance(values.get(k), str) and ":" in values[k]]


def saved_settings(run_dir: str | None, resume: str) -> dict[str, Any]:
    path = Path(run_dir) / "config.json" if run_dir else None
    if path is None or resume == "never" or not path.is_file():
        return {}
    refuse_link(path)
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e}); restore it, or delete it and pass the run's options "
                         "again (the checkpoints are kept, and resuming checks the options against them)") from None
    return check_types({k: v for k, v in saved.items() if k in FIELDS and k not in PER_INVOCATION}, str(path))


def config_from_dict(values: dict[str, Any]) -> FitConfig:
    known = {k: v for k, v in values.items() if k in FIELDS}
    return FitConfig(**check_types(known, "checkpoint config"))


def dump_json(cfg: FitConfig, launch: dict[str, Any], path: Path, **sections: Any) -> None:
    """The settings at the top level (what `fit --run-dir` reads back), how it ran under "launch",
    and any other `sections` (the optimizer and schedule as built) under their own names. Written
    as a new file (a symbolic link at `path` is replaced, never followed)."""
    settings = {k: v for k, v in cfg.to_dict().items() if not (cfg.task and k in BUILTIN_TASK_ONLY)}
    replace_text(path, json.dumps({**settings, "launch": launch, **sections}, indent=2, sort_keys=True) + "\n")


# Settings only the built-in task (--data/--model) reads: a --task run's config.json leaves them out.
BUILTIN_TASK_ONLY = frozenset({"data", "download", "samples", "val_samples", "input_shape", "classes", "image_size",
                               "augment", "model", "hidden", "pretrained", "label_smoothing", "metrics"})
