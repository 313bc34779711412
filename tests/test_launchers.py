"""Launches without torchrun: two plain processes with env:// variables (a Kubernetes pod each) and
Open MPI's mpirun train to the weights of torchrun; the job's store listens where the job names."""

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch

from conftest import ROOT, base_env, fit_cmd, free_port, run_fit

pytestmark = pytest.mark.slow

STEPS = ["--max-steps", "12", "--save-every-seconds", "0"]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _assert_same_weights(run_dir, reference):
    got, want = _weights(run_dir), _weights(reference)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"max weight difference to torchrun: {diff:.3g}")
    assert got.keys() == want.keys() and diff <= 1e-6


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory):
    """The weights of the tiny run under torchrun with 2 ranks, for every launcher to match."""
    folder = tmp_path_factory.mktemp("torchrun")
    run_fit(2, *_tiny(folder / "run"))
    return folder / "run"


def _tiny(run_dir, *extra):
    return ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "256", "--val-samples",
            "101", "--model", "mlp", "--hidden", "32", "--batch-size", "16", "--run-dir", str(run_dir),
            "--log-every", "5", "--no-progress", *STEPS, *extra]


def _listening(port):
    """The local addresses of listening TCP sockets on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


def test_store_listens_on_the_address_the_job_names():
    from ddp_train.dist import _store
    from ddp_train.distenv import DistEnv

    port = free_port()
    env = DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": str(port)})
    store = _store(env, timedelta(seconds=10))
    store.set("k", "v")
    assert _listening(port) == ["0100007F"]  # 127.0.0.1 only; not 0.0.0.0, not ::
    del store


def test_plain_env_processes_train_like_torchrun(tmp_path, torchrun_reference):
    # what a Kubeflow PyTorchJob sets in each pod, and nothing else
    port = str(free_port())
    procs = [subprocess.Popen(fit_cmd(1, *_tiny(tmp_path / "run")), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                                   WORLD_SIZE="2", RANK=str(rank)))
             for rank in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "launcher=env world_size=2" in outs[0][1]
    _assert_same_weights(tmp_path / "run", torchrun_reference)


MPIRUN = shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None and os.environ.get("CI", "").lower() not in ("true", "1"),
                                  reason="Open MPI's mpirun is not installed (apt-get install openmpi-bin)")


def _mpirun(*args):
    # as root (CI) Open MPI wants --allow-run-as-root; --oversubscribe: 2 ranks on a small machine
    return [MPIRUN or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
            sys.executable, "-m", "ddp_train", "fit", *args]


@needs_mpirun
def test_mpirun_trains_like_torchrun(tmp_path, torchrun_reference):
    proc = subprocess.run(_mpirun(*_tiny(tmp_path / "run")), cwd=ROOT, env=base_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launcher=mpi world_size=2" in proc.stdout + proc.stderr
    _assert_same_weights(tmp_path / "run", torchrun_reference)


@needs_mpirun
def test_sigterm_to_the_mpirun_script_checkpoints_and_exits_3(tmp_path):
    """docs/clusters.md's wrapper: Open MPI's mpirun does not forward SIGTERM (it kills the ranks a
    second later and exits 1), so the script turns SIGTERM into SIGUSR1, which mpirun forwards."""
    command = " ".join(_mpirun(*_tiny(tmp_path / "run", "--epochs", "100000", "--max-steps", "1000000", "--preempt-signal", "USR1")))
    script = f'{command} &\ntrap \'kill -USR1 $!\' TERM\nwait $!\nwait $!\n'
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=base_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not (tmp_path / "run" / "checkpoints" / "last.pt").exists():  # trained a while
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "preempted: checkpoint" in out
    step = int(out.split("preempted: checkpoint")[1].split(" at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == step
