"""Commands around training (evaluate, predict, summary, export, plot, env, bench).

Each module defines a typer-style function whose imports of torch happen inside it, so that
`ddp-train --help` stays fast; COMMANDS maps command names to them.
"""

import inspect

from .bench import bench
from .environment import env
from .evaluate import evaluate
from .export import export
from .plot import plot
from .predict import predict
from .summary import summary


def _keep_examples(fn):
    """click rewraps every paragraph of a help text; "\\b" keeps indented example lines as written."""
    paragraphs = inspect.cleandoc(fn.__doc__).split("\n\n")
    fn.__doc__ = "\n\n".join("\b\n" + p if p.startswith(" ") else p for p in paragraphs)
    return fn


COMMANDS: dict = {fn.__name__: _keep_examples(fn) for fn in (evaluate, predict, summary, export, plot, env, bench)}
