"""Never lose work: bit-exact resume, SIGTERM preemption, torchrun restarts, crash-safe saves."""

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_env, fit_cmd, run_fit
from ddp_train import checkpoint
from ddp_train.checkpoint import plain

pytestmark = pytest.mark.slow

# A CNN (with dropout, so the RNG matters) on 16 steps per epoch; two epochs.
CNN = ["--data", "synthetic", "--input-shape", "1,16,16", "--classes", "4", "--samples", "512",
       "--val-samples", "64", "--model", "cnn", "--epochs", "2", "--log-every", "4", "--no-progress",
       "--scheduler", "onecycle"]


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("nproc, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_mid_epoch_resume_is_bit_exact(tmp_path, nproc, workers):
    batch = str(32 // nproc)
    opts = [*CNN, "--batch-size", batch, "--workers", str(workers), "--save-every", "4", "--keep", "10"]
    run_fit(nproc, *opts, "--run-dir", str(tmp_path / "full"))
    # step 12 of 16 in epoch 1: exactly what an interrupted run leaves behind
    mid = tmp_path / "full" / "checkpoints" / "step-00000012.pt"
    assert _ckpt(mid)["batch_in_epoch"] == 12
    proc = run_fit(nproc, *opts, "--run-dir", str(tmp_path / "resumed"), "--resume", str(mid))
    assert "resumed from" in proc.stderr and "epoch 1, step 12 (12 of the epoch's 16 steps done)" in proc.stderr
    full, resumed = (_ckpt(tmp_path / d / "checkpoints" / "last.pt") for d in ("full", "resumed"))
    _assert_same_training_state(full, resumed)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# 64 steps per epoch at 2 ranks, 20 ms each at least: a signal after step 20 lands mid-run anywhere.
LONG = ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "1024",
        "--val-samples", "64", "--model", "tests.fixtures.userdefs:slow_mlp", "--epochs", "2",
        "--batch-size", "8", "--log-every", "10", "--no-progress"]


def test_sigterm_to_torchrun_checkpoints_mid_epoch_and_resume_matches(tmp_path):
    """SIGTERM to torchrun (forwarded to both ranks) mid-epoch: the ranks agree on a step (the stop
    vote), rank 0 checkpoints it and says so (the workers exit 3; plain torchrun itself then exits 1
    with its own SignalException report); resume equals an uninterrupted run."""
    run_dir = tmp_path / "pre"
    # saving a step file every step: the preemption checkpoint is a step file too
    proc = subprocess.Popen(fit_cmd(2, *LONG, "--run-dir", str(run_dir), "--save-every", "1", "--keep", "2"),
                            env=base_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(e["event"] == "train" and e["step"] >= 20 for e in _events(run_dir)), 120,
              "training to start")
    reached = max(e["step"] for e in _events(run_dir) if e["event"] == "train")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    print(f"SIGTERM to exit: {took:.2f}s")
    assert took < 10, f"SIGTERM to exit took {took:.1f}s (measured 2-3 s on a loaded 2-core machine)"
    [(path, step)] = re.findall(r"preempted: checkpoint (\S+) at step (\d+); exiting with code 3", err)
    assert f"run the same command again, or: torchrun --standalone --nproc_per_node=2 -m ddp_train fit --run-dir {run_dir}" in err
    ckpt = _ckpt(run_dir / "checkpoints" / "last.pt")
    assert path == str(run_dir / "checkpoints" / "last.pt") and ckpt["step"] == int(step)
    # the state at the stop, not an older save: no earlier than the last step logged before the signal
    assert reached <= ckpt["step"] < 2 * 64 and ckpt["batch_in_epoch"] > 0
    assert (run_dir / "checkpoints" / f"step-{ckpt['step']:08d}.pt").is_file()
    resumed = run_fit(2, *LONG, "--run-dir", str(run_dir))
    assert f"step {ckpt['step']}" in resumed.stderr
    run_fit(2, *LONG, "--run-dir", str(tmp_path / "ref"))
    _assert_same_training_state(_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt"),
                                _ckpt(run_dir / "checkpoints" / "last.pt"))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_torchrun_restarts_after_sigkill_and_finishes(tmp_path):
    run_dir = tmp_path / "restart"
    cmd = fit_cmd(2, *LONG, "--run-dir", str(run_dir), "--save-every", "20")
    cmd.insert(2, "--max-restarts=1")
    proc = subprocess.Popen(cmd, env=base_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: (run_dir / "checkpoints" / "step-00000040.pt").exists(), 120, "a periodic checkpoint")
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(random.choice(workers), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "resumed from" in err
    final = _ckpt(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == 2 * 64 and final["epoch"] == 2
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"]


def _writer(path: Path) -> None:
    """Child: write checkpoints back to back until killed."""
    state = {"model": {"w": torch.randn(512, 1024)}, "version": 1}
    step = 0
    while True:
        step += 1
        state["step"] = step
        plain.write(state, path, best=step % 3 == 0, step_file=step % 2 == 0, keep=2)


def test_sigkill_during_saves_never_leaves_a_bad_checkpoint(tmp_path):
    trials = 25
    rng = random.Random(0)
    for trial in range(trials):
        ckpt_dir = tmp_path / f"t{trial}"
        ckpt_dir.mkdir()
        pid = os.fork()
        if pid == 0:
            try:
                _writer(ckpt_dir)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not (ckpt_dir / "last.pt").exists():
            continue  # killed before the first save finished: nothing to lose
        latest = checkpoint.latest(ckpt_dir)
        assert latest is not None
        for path in checkpoint.candidates(ckpt_dir):
            assert checkpoint.load(path)["model"]["w"].shape == (512, 1024)
    print(f"{trials} SIGKILL-during-save trials survived")


def test_sigkill_during_training_always_resumes(tmp_path):
    """A real run killed at random moments (saving every step) always resumes and finishes."""
    run_dir = tmp_path / "kill"
    opts = [*LONG, "--epochs", "1", "--save-every", "1", "--keep", "2", "--run-dir", str(run_dir)]
    rng = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen(fit_cmd(1, *opts), env=base_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: any(e["event"] == "first_step" for e in _events(run_dir)) or proc.poll() is not None,
                  120, "the first step")
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        assert checkpoint.load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] >= 1
    run_fit(1, *opts)
    assert _ckpt(run_dir / "checkpoints" / "last.pt")["step"] == 128


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    proc = run_fit(1, *tiny("nan", "--model", "tests.fixtures.userdefs:nan_after_3", "--save-every", "2",
                            "--log-every", "2"), check=False)
    assert proc.returncode == 1
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    # the 4th forward is the first NaN: step 4 of epoch 1, and the checkpoint of step 2 is the good one
    assert proc.stderr.count("error: the training loss became nan at step 4 (epoch 1); "
                             f"the last good checkpoint is {last} (step 2)") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    good = _ckpt(last)
    assert good["step"] == 2 and all(torch.isfinite(t).all() for t in good["model"].values())


def test_nan_before_any_checkpoint_says_so(tiny):
    proc = run_fit(1, *tiny("nan0", "--model", "tests.fixtures.userdefs:nan_after_3", "--log-every", "50"),
                   check=False)
    assert proc.returncode == 1
    assert "the training loss became nan at step 4 (epoch 1); no checkpoint was written before it" in proc.stderr


def test_skip_nonfinite_goes_on_past_a_few_bad_steps(tiny, tmp_path):
    proc = run_fit(1, *tiny("skip", "--model", "tests.fixtures.userdefs:nan_at_4_and_5", "--skip-nonfinite",
                            "--max-steps", "8"), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("non-finite gradients, step skipped") == 2


def test_skip_nonfinite_stops_a_diverged_run(tiny, tmp_path):
    """A model that stays NaN: skipping cannot save it; the run stops instead of "succeeding"."""
    proc = run_fit(1, *tiny("diverged", "--model", "tests.fixtures.userdefs:nan_after_3", "--skip-nonfinite",
                            "--max-skipped", "3", "--epochs", "3"), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "error: 3 steps in a row had non-finite gradients (up to step 6, epoch 1)" in proc.stderr
    assert not (tmp_path / "diverged" / "checkpoints" / "best.pt").exists()


def test_resume_refuses_a_changed_config(tiny, tmp_path):
    run_fit(1, *tiny("cfg", "--max-steps", "2"))
    proc = run_fit(1, *tiny("cfg", "--max-steps", "4", "--batch-size", "8", "--lr", "0.1"), check=False)
    assert proc.returncode == 2
    assert "settings differ" in proc.stderr and "--batch-size 16 -> 8" in proc.stderr
    assert "--lr 0.001 -> 0.1" in proc.stderr
    more = run_fit(1, *tiny("cfg", "--max-steps", "4"))
    assert "resumed from" in more.stderr
    assert _ckpt(tmp_path / "cfg" / "checkpoints" / "last.pt")["step"] == 4


def test_init_from_strips_wrapper_prefixes(tiny, tmp_path):
    run_fit(1, *tiny("src", "--max-steps", "1"))
    state = _ckpt(tmp_path / "src" / "checkpoints" / "last.pt")["model"]
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
    # SGD at lr 1e-30 leaves float32 weights bit-identical: last.pt holds exactly what was loaded
    proc = run_fit(1, *tiny("dst", "--max-steps", "1", "--optimizer", "sgd", "--lr", "1e-30", "--momentum", "0",
                            "--init-from", str(tmp_path / "wrapped.pt")))
    assert "initialised weights from" in proc.stderr
    loaded = _ckpt(tmp_path / "dst" / "checkpoints" / "last.pt")["model"]
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

