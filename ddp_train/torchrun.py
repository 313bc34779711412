"""`ddp-torchrun ARGS` (`python -m ddp_train.torchrun`): torchrun itself (the same arguments), with
ddp_train's exits.

- After a success it ends without the interpreter's teardown: torchrun's agent sees its workers
  exit within ~0.03 s, then its own interpreter exit (torch is loaded) takes ~0.5 s on 2 CPU cores,
  more than the whole of ddp_train's teardown. It ends the way `ddp-train` ends its workers
  (ddp_train.dist.exit_process: atexit handlers run, files are closed, then os._exit).
- When a worker exits with a code of its own (2 bad input, 3 preempted, 1 crash), that worker has
  already said why on its `error:` line: the launcher exits with the same code and adds nothing
  (plain torchrun exits 1 and prints its ChildFailedError report with a traceback of its frames).
  A worker killed by a signal said nothing, so one line names it.
- Ctrl-C: torchrun's agent forwards SIGINT to its workers (they run in sessions of their own, so
  the terminal's SIGINT reaches the agent alone), waits for them, then raises SignalException,
  which plain torchrun prints as a traceback. The workers have said what happened (`interrupted at
  step N; saved ...`): the launcher exits 128 + the signal (130), without the traceback or the
  agent's lines about passing the signal on.
"""

from __future__ import annotations

import logging
import signal
import sys


class _SpokenFailures(logging.Filter):
    """Drops the agent's "failed (exitcode: N)" record for a worker that exited on its own, and its
    "Sending process N closing signal SIGTERM" to the others (routine once one has stopped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "closing signal" in str(record.msg):
            return "SIGTERM" not in record.args if isinstance(record.args, tuple) else True
        return not ("failed (exitcode: " in message and "exitcode: -" not in message)


def _not_ctrl_c(record: logging.LogRecord) -> bool:
    """Drops the agent's lines about passing Ctrl-C on to the workers (`Received 2 death signal,
    shutting down workers`, `Sending process N closing signal SIGINT`)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not any(a is signal.SIGINT or a == "SIGINT" for a in args)


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from .dist import exit_process

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_SpokenFailures())
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_not_ctrl_c)
    try:
        torchrun()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal (the OOM killer, kill -9): the worker could not say so
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            print(f"error: rank {rank} (pid {failure.pid}) was killed by {name} (out of memory, or killed from "
                  "outside); the other ranks stopped; rerun the same command to continue from the last "
                  "checkpoint", file=sys.stderr, flush=True)
            code = 1
    except SignalException as e:
        code = 128 + int(e.sigval)
    exit_process(code)


if __name__ == "__main__":
    main()
