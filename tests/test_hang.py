"""A hung rank is named: a rank that is alive but stopped ends the job within --hang-timeout, not
--timeout, with one line naming it; a long evaluation is no false alarm; the workers of a killed
torchrun agent stop."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_env, fit_cmd, free_port

pytestmark = pytest.mark.slow
SLOW = ["--model", "tests.fixtures.userdefs:slow_mlp"]


def _pair(args, **extra_env):
    port = str(free_port())
    return [subprocess.Popen(fit_cmd(1, *args), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                                          RANK=str(rank), **extra_env))
            for rank in range(2)]


def _wait_for_training(run_dir, procs, timeout=180):
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)


def test_stopped_rank_is_named_within_hang_timeout(tiny):
    args = tiny("run", *SLOW, "--epochs", "1000", "--hang-timeout", "5")
    procs = _pair(args)
    _wait_for_training(Path(args[args.index("--run-dir") + 1]), procs)
    os.kill(procs[1].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=120)  # --timeout is 600 s
        detected = time.monotonic() - stopped
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"rank 1 stopped; rank 0 ended {detected:.1f} s later: {err0.strip().splitlines()[-1]}")
    assert procs[1].returncode == -signal.SIGKILL  # killed by its neighbour: the first to exit
    assert procs[0].returncode == 1
    errors = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err0
    verdict = re.fullmatch(r"error: \[rank 0\] stopping: rank 1 \(pid \d+ on \S+\) stopped responding at step \d+: "
                           r"no heartbeat for (\d+) s \(--hang-timeout 5\); the job stopped rather than wait "
                           r"--timeout 600 s for it", errors[0])
    assert verdict, errors[0]
    assert int(verdict[1]) >= 5  # named only after --hang-timeout of silence (and well before --timeout)
    assert "Traceback" not in err0


def test_long_evaluation_is_no_false_alarm(tiny):
    procs = _pair(tiny("run", "--model", "tests.fixtures.userdefs:slow_eval_mlp", "--max-steps", "8",
                       "--hang-timeout", "3"))
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "done: 8 steps" in outs[0][1]


def test_workers_of_a_killed_agent_stop(tiny):
    args = tiny("run", *SLOW, "--epochs", "1000")
    agent = subprocess.Popen(fit_cmd(2, *args), cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    run_dir = Path(args[args.index("--run-dir") + 1])
    try:
        _wait_for_training(run_dir, [agent])
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2
        agent.kill()
        killed, deadline = time.monotonic(), time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers):
            assert time.monotonic() < deadline, "the workers train on without their agent"
            time.sleep(0.02)
        print(f"workers gone {time.monotonic() - killed:.2f} s after the agent was killed")
    finally:
        agent.kill()
        agent.wait()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] != "end"


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


CALLER = """
import sys
from ddp_train import fit
from ddp_train.errors import PeerFailure
try:
    fit(data="synthetic", input_shape="16", classes=4, samples=256, val_samples=101, batch_size=16,
        model="tests.fixtures.userdefs:fail_on_rank1", run_dir=sys.argv[1], progress=False)
except PeerFailure as e:
    print(f"caught PeerFailure: {e}")
    sys.exit(7)
"""


def test_python_caller_gets_an_exception_when_a_peer_fails(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path / "run")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert procs[0].returncode == 7, outs  # fit() raised into the script; no os._exit from the watchdog
    assert "caught PeerFailure: rank 1: RuntimeError: injected failure on rank 1" in outs[0][0]
