"""`fit()`: the engine's one entry point, for the command line and for the user's own scripts.

    from ddp_train import Task, fit
    result = fit(MyTask(), epochs=3, batch_size=32, run_dir="runs/x")

Works under `python`, `torchrun` and srun alike: the launch is read from the environment. Bad input
raises ddp_train.UsageError (the one line the command line prints). A run stopped by a signal
raises ddp_train.Preempted (SIGTERM, --preempt-signal: exit code 3) or ddp_train.Interrupted
(Ctrl-C: 130) once its checkpoint is durable: SystemExits, so a script that does not catch them
exits as the command line does, without a traceback.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import sys
import traceback

from .config import FitConfig, build_config, check_types
from .errors import PEER_LOST, AgreedError, Interrupted, PeerFailure, Preempted
from .result import FitResult
from .task import Task


def fit(task: Task | None = None, cfg: FitConfig | None = None, *, config: str | None = None,
        **options: Any) -> FitResult:
    """Train `task` on every process of this launch (python, torchrun or srun), resuming its run
    directory's latest checkpoint when there is one.

    Must be called on all processes of the job, with the same arguments: it joins them into one
    process group, and every collective it runs needs every rank.

    Args:
        task: an instance of your `Task` subclass (not the class). None: the built-in task that
            --data/--model (or --task) describe.
        cfg: a whole `FitConfig`; `options` and `config`, if also given, override its fields.
        config: a TOML file of options, as `ddp-train fit --config` reads it (options override it).
        **options: `FitConfig` fields by name, as `ddp-train fit`'s options are named with `_` for
            `-` (epochs=3, batch_size=32, run_dir="runs/x", ...).

    Returns:
        A `FitResult` with status "done", "early_stop" or "nothing_to_do" (the run directory's
        checkpoint had already finished the run), the steps and epochs taken, the last
        evaluation's metrics and the newest checkpoint.

    Raises:
        TypeError: `task` is not a `Task` instance (or is the class itself).
        UsageError: bad input (an unknown option or one of the wrong type, data that does not fit
            the model, a resume that would change the run); its message is the command line's
            `error:` line.
        TrainingError: training cannot go on (a non-finite training or validation loss, too many
            steps in a row with non-finite gradients).
        PeerFailure: another rank of the job died; its own log says why (RankError on the rank
            whose own error it is, e.g. an out-of-memory).
        Preempted: SIGTERM or --preempt-signal stopped the run once its checkpoint was durable
            (a `Stopped`, which is a SystemExit with code 3); calling `fit` the same way again
            continues it. Uncaught, the script exits with code 3 and no traceback.
        Interrupted: Ctrl-C, likewise (exit code 130).

    Example::

        from ddp_train import Task, fit

        class Digits(Task):
            def data(self, cfg): ...
            def model(self, cfg): ...

        result = fit(Digits(), epochs=3, batch_size=32, run_dir="runs/digits")
        print(result.status, result.metrics["val_loss"], result.checkpoint)

    Run the same script under `torchrun --nproc-per-node 4 script.py` for four processes: the
    launch is read from the environment.
    """
    import torch

    from . import train
    from .dist import distributed
    from .distenv import DistEnv
    from .log import setup_logging
    from .numerics import numerics
    from .preempt import PreemptFlag
    from .task import absolute_spec, check_settings, from_config

    options = check_types(options, "fit()")
    if cfg is None:
        cfg = build_config(options, config, own_task=task is not None)
    elif options or config:
        cfg = build_config({**cfg.to_dict(), **options}, config, own_task=task is not None)
    if isinstance(task, type) and issubclass(task, Task):
        raise TypeError(f"fit() takes an instance of your Task, not the class: fit({task.__name__}()), "
                        f"not fit({task.__name__})")
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"fit() takes a ddp_train.Task instance, got {type(task).__name__}")
    if task is None:
        task = from_config(cfg)
        if cfg.task:  # every constructor argument, defaults included, is a setting of the run
            cfg = cfg.replace(task=absolute_spec(cfg.task), task_args=check_settings(task) or None)
    else:
        cfg = train.describe_task(task, cfg)
    env = DistEnv.from_environ(os.environ, cuda_devices=torch.cuda.device_count(), backend=cfg.backend)
    setup_logging(env.rank, cfg.log_all_ranks)
    main_thread = threading.current_thread() is threading.main_thread()
    preempt = PreemptFlag(cfg.preempt_signal, announce=env.is_main) if main_thread else None
    try:
        with distributed(env, cfg.timeout, cfg.hang_timeout) as comm, numerics(cfg.deterministic, cfg.tf32, env.device.split(":")[0]):
            try:
                result = train.run(cfg, task, env, comm, preempt or _NoSignals())
            except AgreedError as e:
                # Print now, while SIGTERM only sets a flag: torchrun stops rank 0 as soon as
                # another rank has exited with the same error.
                if env.is_main:
                    _report(e, cfg.debug)
                raise
            except (RuntimeError, ConnectionError) as e:
                peer = comm.peer_failure()
                if peer:
                    raise PeerFailure(peer) from e
                if any(s in str(e) for s in PEER_LOST):
                    raise PeerFailure("another rank died (its connection closed); its own log says why") from e
                raise
    finally:
        if preempt is not None:
            preempt.restore()
    if result.status == "preempted":
        raise Preempted(result)
    if result.status == "interrupted":
        raise Interrupted(result)
    return result


def _report(e: AgreedError, debug: bool) -> None:
    """Rank 0: the user's frames (for errors in their code; all frames with --debug), then one line."""
    details = getattr(e, "details", "")  # UserCodeError's frames
    if debug:
        traceback.print_exc()
    elif details:
        print(details, end="", file=sys.stderr)
    print(f"error: {e}", file=sys.stderr, flush=True)
    e.reported = True


class _NoSignals:
    """fit() outside the main thread cannot install signal handlers: no preemption flag."""

    requested = None
