"""Commands around training (evaluate, predict, summary, plot, env, bench).

Each module defines a typer-style function whose imports of torch happen inside it, so that
`ddp-train --help` stays fast; COMMANDS maps command names to them.
"""

COMMANDS: dict = {}
