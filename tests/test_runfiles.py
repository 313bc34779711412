"""Run files are repaired, never trusted blindly: history.csv and metrics.jsonl are rebuilt to the
resumed step from their intact lines, and the advice of an error about them is safe to follow."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from ddp_train import repair
from ddp_train.cli import app
from ddp_train.errors import UsageError

HEADER = "epoch,step,train_loss,val_loss,lr\r\n"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")
OPTS = ["--data", "synthetic", "--input-shape", "8", "--classes", "3", "--samples", "64", "--val-samples", "16",
        "--model", "mlp", "--hidden", "8", "--batch-size", "16", "--no-progress"]


def test_a_torn_last_history_row_is_dropped_and_a_bad_row_deletes_nothing_else():
    text = (HEADER + "1,4,1.5,1.4,0.1\r\n" + "2,8,oops,1.3\r\n" + "3,12,1.3,1.2,0.1\r\n" + "4,16,1.2,1.1,0.1\r\n"
            + "5,20,1.1,1.0,0.")  # the crash cut the last row short: lr would read 0
    rebuilt, dropped = repair.history(text, step=16)
    rows = list(csv.DictReader(rebuilt.splitlines()))
    assert [r["step"] for r in rows] == ["4", "12", "16"] and dropped == 2
    assert rebuilt.endswith("\r\n")
    rebuilt, _ = repair.history(text, step=12)  # rows after the resumed step go: they will be written again
    assert [r["step"] for r in csv.DictReader(rebuilt.splitlines())] == ["4", "12"]
    assert repair.history("garbage without a header\n", 4) == (None, 0)


def test_torn_and_unreadable_metrics_lines_are_dropped_alone():
    lines = [{"event": "start", "time": 1.0}, {"event": "train", "step": 4}, {"event": "eval", "step": 8}]
    text = "".join(json.dumps(x) + "\n" for x in lines[:2]) + "{not json\n" + json.dumps(lines[2]) + "\n"
    rebuilt, dropped = repair.metrics(text + '{"event": "train", "st', step=8)
    assert [json.loads(x) for x in rebuilt.splitlines()] == lines and dropped == 2
    rebuilt, _ = repair.metrics(text, step=4)
    assert [json.loads(x) for x in rebuilt.splitlines()] == lines[:2]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={k: None for k in LAUNCH_VARS})


def test_a_resume_rebuilds_the_run_files_from_what_is_intact(tmp_path):
    run_dir = tmp_path / "run"
    assert invoke("fit", *OPTS, "--epochs", "2", "--run-dir", str(run_dir)).exit_code == 0
    history = run_dir / "history.csv"
    good = history.read_text()
    with history.open("a", newline="") as f:
        f.write("3,12,nan-ish,x\r\n4,16,0.9,0.")  # an unreadable row, then one torn by a crash
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 99, "lo')
    result = invoke("fit", *OPTS, "--epochs", "3", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(history.open()))
    assert [r["step"] for r in rows] == ["4", "8", "12"]  # both good rows kept, the new epoch appended
    assert history.read_text().startswith(good)
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_following_the_advice_for_an_unreadable_config_loses_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert invoke("fit", *OPTS, "--epochs", "2", "--run-dir", str(run_dir)).exit_code == 0
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    rows = (run_dir / "history.csv").read_text()
    config = run_dir / "config.json"
    config.write_text('{"lr": 0.1, "epo')  # torn by a crash
    refused = invoke("fit", *OPTS, "--epochs", "3", "--run-dir", str(run_dir))
    assert isinstance(refused.exception, UsageError)
    assert str(refused.exception).endswith("; restore it, or delete it and pass the run's options again (the "
                                           "checkpoints are kept, and resuming checks the options against them)")
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    config.unlink()  # the advice
    result = invoke("fit", *OPTS, "--epochs", "3", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    after = list(csv.DictReader((run_dir / "history.csv").open()))
    assert (run_dir / "history.csv").read_text().startswith(rows) and [r["step"] for r in after] == ["4", "8", "12"]
    assert json.loads(config.read_text())["epochs"] == 3
