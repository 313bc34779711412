"""What a run shows and records: the progress bar and log lines, TensorBoard, a Task's own values."""

from __future__ import annotations

import io
import re

from rich.console import Console

from ddp_train.log import Progress, log, setup_logging


def test_log_lines_print_above_the_bar_which_counts_the_runs_steps():
    out = io.StringIO()
    setup_logging(0, False)
    bar = Progress(True, console=Console(file=out, force_terminal=True, width=120))
    bar.start_epoch(1, None, 30, 0)  # --max-steps 30 ends the run inside epoch 1 of 10
    for _ in range(12):
        bar.advance()
    log.info("epoch 1 step 12 train_loss 0.9 val_loss 0.8")
    bar.start_epoch(2, None, 30, 12)
    bar.close()
    screen = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part) for part in re.split(r"[\r\n]", out.getvalue())]
    logged = [line for line in screen if "train_loss" in line]
    assert logged == ["epoch 1 step 12 train_loss 0.9 val_loss 0.8"], screen  # a line of its own, no bar on it
    bars = [line for line in screen if "━" in line]
    assert bars and all(re.match(r"epoch [12] ━", line) for line in bars), bars  # no "/10": the steps decide
    assert any(" 12/30 " in line for line in bars) and not any("/12" in line for line in bars), bars
