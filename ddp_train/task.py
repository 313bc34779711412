"""The Task: the user's training job in five methods, and the built-in tasks behind --data/--model.

Everything distributed stays outside the Task: samplers, wrapping, syncing, checkpoints and
signals. A Task never sees a rank, a process group or a DDP wrapper. Its settings are its
constructor's keyword arguments: recorded in config.json and checked on resume.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Any, Callable

import torch
from torch import nn

from .batch import count as samples
from .config import FitConfig, parse_shape
from .errors import UsageError
from .userfn import load_user_object, user_code


class Task:
    """Subclass it and override what your job does differently:

    - `data(cfg)` -> {"train": ds, "val": ds} (optionally "test"): map-style data sets whose samples
      are tensors, or tuples/lists/dicts of them;
    - `model(cfg)` -> the bare nn.Module;
    - `loss(model, batch)` -> scalar tensor, the mean over the batch's samples
      (default: `criterion(*eval_step(model, batch))`);
    - `metrics()` -> {name: torchmetrics.Metric}, reported as val_<name> (default: none);
    - `eval_step(model, batch)` -> (outputs, targets) that feed the metrics (default: for a batch
      (x, y), `model(x), y`);
    - `criterion(outputs, targets)` -> the mean loss (default: cross-entropy for integer targets,
      else mean squared error); defining it lets evaluation get loss and metrics from one forward;
    - `blocks(model)` -> the modules to shard one by one under --strategy fsdp (default: the
      model's top-level children that hold parameters);
    - `optimizer(model, cfg)` -> a torch.optim.Optimizer over the model's parameters, with any
      parameter groups (default: None, the built-in --optimizer/--lr/--weight-decay);
    - `scheduler(optimizer, cfg, steps)` -> a learning-rate scheduler stepped after every optimizer
      step, or (scheduler, "epoch") to step it after every epoch (default: None, the built-in
      --scheduler/--warmup-steps);
    - `collate(split)` -> the function that turns a list of samples into a batch for "train",
      "val" or "test" (a Hugging Face collator works as it is), or None for torch's default;
    - `count(batch)` -> how many units (valid tokens, pixels) the batch's loss is a mean over
      (default: its samples); overriding it makes the gradient, the logged training loss and
      val_loss exact means over all the units of a step or a split, across micro-batches and ranks.

    `eval_step` may also return `(outputs, targets, loss)`: evaluation then takes the loss from it,
    one forward per batch even when the Task overrides `loss()`. Randomness during evaluation (a
    masking collator, random ops in `eval_step`) is seeded from (seed, sample index): a checkpoint
    evaluates to the same figures every time, at any world size. See docs/tasks-advanced.md.

    The constructor's arguments are the Task's settings (`settings`): recorded in config.json,
    checked on resume, and given again by the tools that rebuild the Task from a checkpoint.

    Example::

        import torch
        from torch import nn
        from ddp_train import Task, TensorData, fit

        class Regression(Task):
            def __init__(self, width: int = 32):
                self.width = width

            def data(self, cfg):
                x = torch.randn(1000, 8)
                y = x.sum(1, keepdim=True)
                return {"train": TensorData(x[:800], y[:800]), "val": TensorData(x[800:], y[800:])}

            def model(self, cfg):
                return nn.Sequential(nn.Linear(8, self.width), nn.ReLU(), nn.Linear(self.width, 1))

        fit(Regression(width=64), epochs=5)  # float targets: mean squared error
    """

    _settings: dict[str, Any]  # the constructor's arguments, recorded by __new__

    def __new__(cls, *args: Any, **kwargs: Any) -> "Task":
        self = super().__new__(cls)
        settings: dict[str, Any] = {}
        if cls.__init__ is not object.__init__:
            signature = inspect.signature(cls.__init__)
            try:
                bound = signature.bind(None, *args, **kwargs)
            except TypeError:  # __init__ itself will raise the clear error
                bound = None
            if bound:
                bound.apply_defaults()
            for name, value in list(bound.arguments.items())[1:] if bound else []:
                kind = signature.parameters[name].kind
                settings.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        self._settings = settings
        return self

    def data(self, cfg: FitConfig) -> dict[str, Any]:
        """Build the data sets. Called on every rank (with --download, rank 0 first: one download).

        Args:
            cfg: the run's settings (e.g. `cfg.data_dir`, `cfg.seed`).

        Returns:
            {"train": ds, "val": ds} and optionally "test": map-style data sets (`__len__` and
            `__getitem__`; "train" may also be an IterableDataset, a stream) whose samples are
            tensors or tuples/lists/dicts of them. ddp_train builds the loaders: give data sets, not
            DataLoaders.

        Raises:
            NotImplementedError: not overridden (every Task must define it).

        Example::

            def data(self, cfg):
                train = torchvision.datasets.MNIST(cfg.data_dir, train=True, transform=ToTensor())
                val = torchvision.datasets.MNIST(cfg.data_dir, train=False, transform=ToTensor())
                return {"train": train, "val": val}
        """
        raise NotImplementedError(f"{type(self).__name__}.data(cfg) must return {{'train': ds, 'val': ds}}")

    def model(self, cfg: FitConfig) -> nn.Module:
        """Build the bare model: ddp_train moves it to the device and wraps it (DDP, FSDP2,
        DataParallel). Called on every rank (with --pretrained, rank 0 first: one download).

        Args:
            cfg: the run's settings.

        Returns:
            The `nn.Module`, unwrapped.

        Raises:
            NotImplementedError: not overridden (every Task must define it).

        Example::

            def model(self, cfg):
                return torchvision.models.resnet18(num_classes=10)
        """
        raise NotImplementedError(f"{type(self).__name__}.model(cfg) must return an nn.Module")

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of one batch (per rank, per micro-batch).

        Args:
            model: the wrapped model: call it, do not unwrap it (DDP and FSDP sync in its forward).
            batch: one batch, on the training device.

        Returns:
            A scalar tensor: the mean over the batch's samples (or over `count(batch)` units).
            Default: `criterion(*eval_step(model, batch))`.

        Example::

            def loss(self, model, batch):
                logits = model(batch["input_ids"])
                return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        """
        return self.criterion(*self.eval_step(model, batch))

    def metrics(self) -> dict[str, Any]:
        """The evaluation's metrics, computed exactly over the whole validation set at any world size.

        Returns:
            {name: torchmetrics.Metric}, fed `eval_step`'s (outputs, targets) and reported as
            val_<name>. Default: none (val_loss, and the built-in tasks' accuracy).

        Example::

            def metrics(self):
                from torchmetrics.classification import MulticlassF1Score
                return {"f1": MulticlassF1Score(num_classes=10, average="macro")}
        """
        return {}

    def eval_step(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        """The evaluation forward of one batch, under torch.no_grad() and model.eval().

        Args:
            model: the wrapped model.
            batch: one batch, on the device.

        Returns:
            (outputs, targets), which feed `metrics()` and `criterion`; or (outputs, targets, loss)
            to give the batch's loss too (one forward even when `loss()` is overridden).
            Default: for a batch (x, y), `(model(x), y)`.

        Raises:
            UsageError: (default only) the batch is not an (input, target) pair.

        Example::

            def eval_step(self, model, batch):
                logits = model(batch["input_ids"])
                return logits.argmax(-1), batch["labels"]
        """
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
            raise UsageError(f"{type(self).__name__}: batches are not (input, target) pairs; define the "
                             "Task's loss(model, batch) and eval_step(model, batch) for them")
        x, y = batch
        return model(x), y

    def criterion(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The mean loss of `eval_step`'s outputs against its targets. Defining it lets evaluation
        take loss and metrics from one forward.

        Args:
            outputs: the model's outputs, as `eval_step` returns them.
            targets: the batch's targets.

        Returns:
            A scalar tensor. Default: cross-entropy for integer targets, else mean squared error.

        Raises:
            UsageError: (default only) the outputs are not a tensor.
            LabelError: (default only) an integer label outside the model's outputs.

        Example::

            def criterion(self, outputs, targets):
                return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)
        """
        if not isinstance(outputs, torch.Tensor):
            raise UsageError(f"{type(self).__name__}: the model returns a {type(outputs).__name__}, not a "
                             "tensor of outputs; define the Task's loss(model, batch) (and eval_step)")
        if not targets.is_floating_point():
            try:
                return nn.functional.cross_entropy(outputs.float(), targets)
            except (IndexError, RuntimeError) as e:  # on CPU: "Target 3 is out of bounds."
                classes = outputs.shape[-1] if outputs.dim() > 1 else 0
                low, high = int(targets.min()), int(targets.max())
                if classes and (low < 0 or high >= classes):
                    raise LabelError(f"labels must be 0..{classes - 1} for the model's {classes} outputs (this "
                                     f"batch has {low}..{high})") from e
                raise
        return nn.functional.mse_loss(outputs.float(), targets.view_as(outputs).float())

    def blocks(self, model: nn.Module) -> list[nn.Module] | None:
        """The modules that --strategy fsdp shards one by one (each gathers its parameters only
        for its own forward and backward).

        Args:
            model: the bare model that `model(cfg)` built.

        Returns:
            A list of submodules, or None for the default: the model's top-level children that hold
            parameters.

        Example::

            def blocks(self, model):
                return list(model.transformer.h)  # one unit per transformer block
        """
        return None

    # Names of `log` values to average over every rank (and over the steps since the last
    # --log-every step): one all-reduce per --log-every steps, written at that step.
    synced_logs: tuple[str, ...] = ()

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Record a value of your own at this training step; call it from `loss` (e.g. an auxiliary
        loss, a gate's load). Rank 0's values are written every --log-every steps, at the step they
        were logged: to metrics.jsonl (`{"event": "task", "step": S, name: value}`), and as
        `task/<name>` to TensorBoard and wandb. No collective: other ranks' values are dropped, and a
        tensor is read only when written, so logging adds no host sync per step. The last value of
        a name in a step counts. A name listed in the class's `synced_logs` is asked to be synced
        instead: its mean over every rank and the steps since the last --log-every step is written
        at that step (one all-reduce per --log-every steps).

        Args:
            name: the value's name (`task/<name>` in TensorBoard and wandb).
            value: a number or a one-element tensor.

        Raises:
            TypeError: `value` is neither a number nor a one-element tensor.

        Example::

            def loss(self, model, batch):
                out, aux = model(batch[0])
                self.log("aux_loss", aux)
                return nn.functional.cross_entropy(out, batch[1]) + 0.01 * aux
        """
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                or isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(f"{type(self).__name__}.log({name!r}, ...) takes a number or a one-element tensor, "
                            f"got {type(value).__name__}")
        self.__dict__.setdefault("_logged", []).append(
            (name, value.detach() if isinstance(value, torch.Tensor) else value))

    def optimizer(self, model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer | None:
        """Build the optimizer from `model`'s parameters (the sharded ones under FSDP: build it here,
        not in `model()`). Any torch.optim class and parameter groups, e.g. no weight decay on biases
        and norm weights. Recorded in config.json by class and per-group hyper-parameters; a resume
        refuses a different one.

        Args:
            model: the model to optimize (sharded under FSDP).
            cfg: the run's settings (`cfg.lr`, `cfg.weight_decay`, ...).

        Returns:
            A torch.optim.Optimizer, or None for the built-in --optimizer.

        Example::

            def optimizer(self, model, cfg):
                decay = [p for p in model.parameters() if p.dim() >= 2]
                no_decay = [p for p in model.parameters() if p.dim() < 2]
                return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        """
        return None

    def scheduler(self, optimizer: torch.optim.Optimizer, cfg: FitConfig, steps: Any) -> Any:
        """Build the learning-rate schedule of `optimizer`: return a torch.optim.lr_scheduler
        scheduler (stepped after every optimizer step) or (scheduler, "epoch") (stepped after every
        epoch). `steps.total` is the run's optimizer steps, `steps.per_epoch` an epoch's (None for
        streaming data). Saved and restored with checkpoints.

        Args:
            optimizer: the run's optimizer (this Task's `optimizer`, or the built-in one).
            cfg: the run's settings.
            steps: the run's step plan: `steps.total`, `steps.per_epoch`.

        Returns:
            A scheduler, (scheduler, "epoch"), or None for the built-in --scheduler.

        Example::

            def scheduler(self, optimizer, cfg, steps):
                return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps.total)
        """
        return None

    def collate(self, split: str) -> Callable[[list[Any]], Any] | None:
        """The collate function for `split` ("train", "val" or "test"), or None for torch's default
        (which stacks equal-shaped samples). Runs in the loader workers when --workers > 0, so it
        must pickle there (a function, or an object such as a Hugging Face collator).

        Args:
            split: "train", "val" or "test".

        Returns:
            A function from a list of samples to a batch, or None for torch's default.

        Example::

            def collate(self, split):
                return DataCollatorForLanguageModeling(self.tokenizer, mlm=False)
        """
        return None

    def count(self, batch: Any) -> int | torch.Tensor:
        """How many units `loss(model, batch)` is a mean over: valid tokens for a padded token loss,
        e.g. `(batch["labels"][:, 1:] != -100).sum()`. The default, the batch's samples, keeps the
        per-batch weighting (no extra collective per step). The loss must stay finite when the
        count is 0 (its weight is then 0).

        Args:
            batch: one batch, on the device.

        Returns:
            An int or a scalar integer tensor (a tensor keeps the step free of host syncs).

        Example::

            def count(self, batch):
                return (batch["labels"][:, 1:] != -100).sum()
        """
        return samples(batch)

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor's arguments by name, defaults included: what config.json records as
        task_args, what a resume checks, and what the tools pass to rebuild the Task."""
        return dict(getattr(self, "_settings", {}))


class LabelError(ValueError):
    """Class labels outside the model's outputs."""


def drain_logged(task: Task) -> list[tuple[str, Any]]:
    """The (name, value) pairs `task.log` recorded since the last call."""
    return task.__dict__.pop("_logged", [])


def overrides(task: Task, method: str) -> bool:
    return getattr(type(task), method) is not getattr(Task, method)


def spec_of(task: Task) -> str:
    """Where the task's class lives, so the tools (and a resume) can build it again."""
    cls = type(task)
    module = cls.__module__
    if module == "__main__" or module.startswith("ddp_train_user_"):
        path = getattr(sys.modules.get(module), "__file__", None)
        if path:
            return f"{os.path.abspath(path)}:{cls.__qualname__}"
    return f"{module}:{cls.__qualname__}"


def absolute_spec(spec: str) -> str:
    """`path/file.py:Class` with an absolute path, so that the tools find it from anywhere."""
    path, _, name = spec.rpartition(":")
    return f"{os.path.abspath(path)}:{name}" if path.endswith(".py") and os.path.isfile(path) else spec


def check_settings(task: Task) -> dict[str, Any]:
    settings = task.settings
    for name, value in settings.items():
        try:
            json.dumps(value)
        except TypeError:
            raise UsageError(f"{type(task).__name__}({name}=...): task settings must be plain values (str, int, "
                             f"float, bool, lists and dicts of them) to be saved in config.json; got "
                             f"{type(value).__name__}") from None
    return settings


def from_config(cfg: FitConfig) -> Task:
    """The Task a configuration names: the user's --task with its --task-arg settings, or the built-in one."""
    if not cfg.task:
        return BuiltinTask(cfg)
    cls = load_user_object(cfg.task, "--task")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UsageError(f"--task {cfg.task} must name a subclass of ddp_train.Task")
    with user_code("--task", cfg.task, "constructing it"):
        return cls(**(cfg.task_args or {}))


class BuiltinTask(Task):
    """--data and --model: the registries' data sets and models, cross-entropy or MSE, exact
    built-in statistics, and torchmetrics metrics named by --metrics."""

    def __init__(self, cfg: FitConfig):
        self.cfg = cfg
        self.bundle: Any = None

    def data(self, cfg: FitConfig) -> dict[str, Any]:
        from .data import build_data

        self.bundle = build_data(cfg)
        splits = {"train": self.bundle.train, "val": self.bundle.val}
        if self.bundle.test is not None:
            splits["test"] = self.bundle.test
        return splits

    @property
    def model_name(self) -> str:
        return self.cfg.model or self.bundle.default_model

    def model(self, cfg: FitConfig) -> nn.Module:
        from .models import build_model

        b = self.bundle
        return build_model(self.model_name, b.input_shape, b.num_outputs, parse_shape(cfg.hidden, "--hidden"),
                           pretrained=cfg.pretrained)

    def criterion(self, outputs: Any, targets: Any) -> torch.Tensor:
        from .data import CLASSIFICATION

        if self.bundle.kind == CLASSIFICATION:
            return nn.functional.cross_entropy(outputs.float(), targets, label_smoothing=self.cfg.label_smoothing)
        return nn.functional.mse_loss(outputs.float(), targets.view_as(outputs).float())

    def metrics(self) -> dict[str, Any]:
        from .metrics import named_metrics

        return named_metrics(self.cfg.metrics, self.bundle.kind, self.bundle.num_outputs) if self.cfg.metrics else {}

    def statistics(self, num_chunks: int, device: torch.device) -> Any:
        """The exact built-in statistics, all-reduced with the loss."""
        from .data import CLASSIFICATION
        from .metrics import ClassificationStats, RegressionStats

        cls = ClassificationStats if self.bundle.kind == CLASSIFICATION else RegressionStats
        return cls(self.bundle.num_outputs, num_chunks, device)
