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
    """Train `task` (default: the built-in task of --data/--model) with `options`, which take the
    names of `ddp-train fit`'s options (epochs=3, batch_size=32, ...), or a whole FitConfig as `cfg`.
    `config` names a TOML file of options, as --config does.

    Returns a FitResult (status done, early_stop or nothing_to_do). Raises:
      UsageError: bad input (its message is the command line's `error:` line);
      TrainingError: training cannot go on (e.g. a non-finite loss);
      Preempted / Interrupted (ddp_train.Stopped, a SystemExit with code 3 / 130): SIGTERM or
        --preempt-signal / Ctrl-C stopped the run once its checkpoint was durable; calling fit the
        same way again continues it. Uncaught, the script exits with that code and no traceback.
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
