"""`python -m ddp_train.torchrun ARGS`: torchrun itself (the same arguments), ending without the
interpreter's teardown once it has succeeded.

torchrun's agent sees its workers exit within ~0.03 s, then its own interpreter exit (torch is
loaded) takes ~0.5 s on 2 CPU cores: more than the whole of ddp_train's teardown. This ends the
agent the way `ddp-train` ends its workers (ddp_train.dist.exit_process: atexit handlers run,
files are closed, then os._exit). A failure takes torchrun's usual path (its report, exit 1)."""

from __future__ import annotations


def main() -> None:
    from torch.distributed.run import main as torchrun

    from .dist import exit_process

    try:
        torchrun()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    exit_process(code)


if __name__ == "__main__":
    main()
