"""launch/ wrappers: a two-node torchrun on localhost (two agents, as two machines would run them)
and the one-node wrapper. No Slurm needed."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import torch

from conftest import ROOT, base_env, free_port

pytestmark = pytest.mark.slow

FIT_ARGS = ["--data", "digits", "--epochs", "1", "--no-progress"]
TIMEOUT = 240


def start(script: str, args: list[str], **variables: str) -> subprocess.Popen:
    env = base_env(TORCHRUN="python -m torch.distributed.run", **variables)
    # Own session, so a hung launch can be killed with all its workers.
    return subprocess.Popen([str(ROOT / "launch" / script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each process's (exit code, output); kills them all if any outlives TIMEOUT."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"launch did not finish within {TIMEOUT} s; output so far: {results}")
    return results


@pytest.mark.parametrize("mode", ["rendezvous", "fixed-ranks"])
def test_two_node_torchrun_on_localhost(tmp_path, mode):
    port, run_dir = free_port(), tmp_path / "run"
    args = [*FIT_ARGS, "--run-dir", str(run_dir)]
    if mode == "rendezvous":
        nodes = [dict(RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"test-{port}") for _ in range(2)]
    else:
        nodes = [dict(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for rank in range(2)]
    results = finish([start("multinode.sh", args, NNODES="2", NPROC_PER_NODE="1", **node) for node in nodes])

    text = "\n".join(out for _, out in results)
    assert [code for code, _ in results] == [0, 0], text
    assert len(re.findall(r"ddp_train: launcher=torchrun world_size=2 ", text)) == 1, text
    assert len(re.findall(r"done: \d+ steps", text)) == 1, text
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2


def test_local_wrapper(tmp_path):
    [(code, out)] = finish([start("local.sh", [*FIT_ARGS, "--run-dir", str(tmp_path / "run")], NPROC="2")])
    assert code == 0, out
    assert len(re.findall(r"ddp_train: launcher=torchrun world_size=2 ", out)) == 1, out


@pytest.mark.parametrize(("variables", "missing"), [
    ({}, "NNODES"),
    ({"NNODES": "2"}, "RDZV_ENDPOINT"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "127.0.0.1:1"}, "RDZV_ID"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR"),
])
def test_multinode_wrapper_names_missing_variables(variables, missing):
    env = {k: v for k, v in base_env().items() if k not in ("NNODES", "RDZV_ENDPOINT", "RDZV_ID", "NODE_RANK")}
    out = subprocess.run([str(ROOT / "launch" / "multinode.sh")], env={**env, **variables}, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0
    assert f"{missing}: set {missing}" in out.stderr
