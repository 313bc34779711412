"""Commands around training (evaluate, predict, summary, plot, env, bench).

Each module defines a typer-style function whose imports of torch happen inside it, so that
`ddp-train --help` stays fast; COMMANDS maps command names to them.
"""

import inspect

from .bench import bench
from .environment import env
from .evaluate import evaluate
from .plot import plot
from .predict import predict
from .summary import summary


def _reflow(fn):
    """typer prints single line breaks of a help text as they are: join each paragraph's lines so
    the terminal wraps them, keeping an example's indentation."""
    paragraphs = inspect.cleandoc(fn.__doc__).split("\n\n")
    fn.__doc__ = "\n\n".join(" ".join([p.splitlines()[0]] + [ln.strip() for ln in p.splitlines()[1:]])
                             for p in paragraphs)
    return fn


COMMANDS: dict = {fn.__name__: _reflow(fn) for fn in (evaluate, predict, summary, plot, env, bench)}
