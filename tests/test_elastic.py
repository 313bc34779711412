"""Elastic torchrun: two agents on localhost (`--nnodes=1:2`, c10d rendezvous); one is SIGKILLed
mid-run with its worker. The other re-forms the group on one node and the run continues from the
newest checkpoint on the smaller world size, to the right step count."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_env, free_port

pytestmark = pytest.mark.slow

# A slow MLP (20 ms per training forward): 8 steps of 32 samples an epoch, 32 in all.
OPTS = ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "256", "--val-samples", "64",
        "--model", "tests.fixtures.userdefs:slow_mlp", "--epochs", "4", "--global-batch-size", "32",
        "--batch-size", "16", "--save-every", "4", "--log-every", "4", "--no-progress"]


# The rendezvous store lives in a process of its own (as etcd or a login node's store would), so
# that either agent can die; both agents then connect to it as clients.
STORE = ("import sys, time, torch.distributed as d; s = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, "
         "wait_for_workers=False); print('up', flush=True); time.sleep(600)")


def _agent(port: int, run_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic",
           "--rdzv-conf=last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3",
           "--monitor-interval=0.5", "-m", "ddp_train", "fit", *OPTS, "--run-dir", str(run_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids + [g for k in kids for g in _descendants(k)]


def test_killed_agent_the_other_continues_on_one_node(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    assert store.stdout.readline().strip() == "up"
    first, second = _agent(port, run_dir, logs[0]), _agent(port, run_dir, logs[1])  # both join the first round
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "step-00000008.pt").exists():
            assert time.monotonic() < deadline, logs[0].read_text()
            assert first.poll() is None and second.poll() is None, logs[0].read_text() + logs[1].read_text()
            time.sleep(0.1)
        newest = max(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
        for pid in [second.pid, *_descendants(second.pid)]:  # the node dies: agent and worker
            os.kill(pid, signal.SIGKILL)
        first.wait(timeout=240)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        store.kill()
    out = logs[0].read_text()
    assert first.returncode == 0, out
    assert "world_size=2" in out and "world_size=1" in out, out
    assert "world size 2 -> 1: the same global batch of 32" in out, out
    resumed = [int(step) for step in re.findall(r"^resumed from \S+: epoch \d+, step (\d+)", out, re.M)]
    assert resumed and resumed[0] >= newest, (newest, out)  # no older checkpoint than the newest at the kill
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["step"] == 32 and ckpt["epoch"] == 4 and ckpt["world_size"] == 1
    print("\n".join(ln for ln in out.splitlines() if "world_size=" in ln or "resumed from" in ln
                    or ln.startswith("done:")))
    assert json.loads((run_dir / "config.json").read_text())["launch"]["world_size"] == 1
