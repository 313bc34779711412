"""Ctrl-C is a stop, not a crash: the first SIGINT saves at the next step boundary and exits 130
with one line, on every launcher; a second one exits at once. fit() raises Interrupted/Preempted
(SystemExits with the CLI's codes), so a script exits as the command line does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_env, fit_cmd, run_fit
from ddp_train import Interrupted, Preempted, Stopped, fit
from tests.fixtures.tasks import DictTask

# 20 ms a step (slow_mlp sleeps): a signal after step 10 lands mid-run with a wide margin.
SLOW = ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "1024", "--val-samples", "64",
        "--model", "tests.fixtures.userdefs:slow_mlp", "--max-steps", "120", "--batch-size", "8", "--log-every", "5",
        "--no-progress"]
LINE = r"interrupted at step (\d+); saved (\S+); rerun the same command to continue"

SEND: dict[int, int] = {}  # loss call -> the signal SignalAt sends itself then (not a Task setting)


class SignalAt(DictTask):
    """Sends its own process a signal inside a step, as Ctrl-C or a scheduler would."""

    def loss(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in SEND:
            os.kill(os.getpid(), SEND.pop(self.calls))
        return super().loss(model, batch)


def _train_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((e["step"] for e in map(json.loads, filter(None, lines)) if e["event"] == "train"), default=0)


def _interrupt(cmd: list[str], run_dir: Path, **popen) -> tuple[int, str]:
    """Start `cmd`, send SIGINT once training has passed step 10; (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **{"env": base_env(), "cwd": ROOT, **popen})
    deadline = time.monotonic() + 120
    while _train_step(run_dir) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig, stopped, code", [(signal.SIGINT, Interrupted, 130), (signal.SIGTERM, Preempted, 3)])
def test_a_signal_makes_fit_raise_the_clis_exit_code_and_the_same_call_continues(tmp_path, capfd, sig, stopped,
                                                                                   code):
    before = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    SEND[3] = sig
    with pytest.raises(stopped) as caught:
        fit(SignalAt(), epochs=2, batch_size=16, run_dir=str(run_dir), progress=False)
    e = caught.value
    assert isinstance(e, (Stopped, SystemExit)) and e.code == e.exit_code == code
    assert e.result.status == ("interrupted" if sig == signal.SIGINT else "preempted") and e.result.exit_code == code
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == e.result.step == 3 and e.result.checkpoint == str(run_dir / "checkpoints" / "last.pt")
    err = capfd.readouterr().err
    if sig == signal.SIGINT:
        assert f"interrupted at step 3; saved {run_dir}/checkpoints/last.pt; rerun the same command to continue" in err
    else:
        assert f"preempted: checkpoint {run_dir}/checkpoints/last.pt at step 3; exiting with code 3" in err
    assert signal.getsignal(signal.SIGINT) is before
    result = fit(SignalAt(), epochs=2, batch_size=16, run_dir=str(run_dir), progress=False)
    assert result.status == "done" and result.step == 26
    assert "resumed from" in capfd.readouterr().err


def test_ctrl_c_on_the_cli_saves_one_line_exit_130_and_the_same_command_resumes(tmp_path):
    cmd = fit_cmd(1, *SLOW, "--run-dir", str(tmp_path / "run"))
    code, err = _interrupt(cmd, tmp_path / "run")
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    [(step, path)] = re.findall(LINE, err)
    assert err.strip().splitlines()[-1].startswith("interrupted at step"), err
    assert path == str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.load(path, weights_only=True)["step"] == int(step) >= 10
    resumed = run_fit(1, *SLOW, "--run-dir", str(tmp_path / "run"))
    assert f"resumed from {path}: epoch 1, step {step}" in resumed.stderr
    assert "done: 120 steps" in resumed.stderr


def test_ctrl_c_under_ddp_torchrun_exits_130_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "ddp_train.torchrun", *fit_cmd(2, *SLOW, "--run-dir", str(tmp_path / "run"))[2:]]
    code, err = _interrupt(cmd, tmp_path / "run")
    assert code == 130, err
    assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err, err
    [(step, path)] = re.findall(LINE, err)
    assert torch.load(path, weights_only=True)["step"] == int(step) >= 10


def test_ctrl_c_in_a_script_calling_fit_exits_130_without_a_traceback(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        from ddp_train import fit
        fit(data="synthetic", input_shape="16", classes=4, samples=1024, val_samples=64, batch_size=8,
            model="tests.fixtures.userdefs:slow_mlp", max_steps=120, log_every=5, progress=False,
            run_dir={str(tmp_path / "run")!r})
        print("not reached: fit raised Interrupted")
    """))
    code, err = _interrupt([sys.executable, str(script)], tmp_path / "run")
    assert code == 130, err
    assert "Traceback" not in err and "not reached" not in err, err
    assert len(re.findall(LINE, err)) == 1, err


def test_a_second_ctrl_c_exits_at_once():
    # No torch: the handler alone. The first signal only sets the flag; the second ends the process.
    script = ("import os, signal; from ddp_train.preempt import PreemptFlag; flag = PreemptFlag(); "
              "os.kill(os.getpid(), signal.SIGINT); print(flag.requested, flush=True); "
              "os.kill(os.getpid(), signal.SIGINT); print('not reached')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=base_env(), cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 130 and proc.stdout == "SIGINT\n", proc
    assert proc.stderr == "SIGINT again: exiting now; the newest complete checkpoint is kept\n"


def test_an_ignored_sigint_stays_ignored():
    """A background job (`cmd &` in a script) ignores SIGINT: fit() must not take Ctrl-C for it."""
    script = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); from ddp_train.preempt import "
              "PreemptFlag; PreemptFlag(); print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=base_env(), cwd=ROOT,
                          timeout=60)
    assert proc.stdout == "True\n", proc
