"""The sbatch scripts in slurm/ on a real Slurm cluster: a fit per script, preemption and requeue.

Needs the two-node cluster of `ci/slurm-cluster.sh start 2` (nodes n1 and n2 on this host, 2 CPUs
and 2 fake GPUs each: jobs get CUDA_VISIBLE_DEVICES, torch still sees no CUDA and trains on CPU
with gloo). Without it the tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("n1", "n2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}

# The only sbatch options the tests add: what fits this cluster's 2 CPUs and 2 fake GPUs per node.
# The number of processes then follows from Slurm's variables inside each script.
FITS_CLUSTER = {
    "single-node": ["--gpus-per-node=2", "--cpus-per-task=2"],  # 2 processes, one per GPU
    "multi-node": ["--gpus-per-node=1", "--cpus-per-task=2"],  # 2 nodes x 1 process
    "srun-ranks": ["--ntasks-per-node=2", "--cpus-per-task=1"],  # 2 ranks, a GPU each
}
SHORT = {"DATA": "digits", "EPOCHS": "1", "EXTRA_ARGS": "--no-progress"}
# 2 epochs of 256 steps at world size 2, a few seconds: a signal sent once step 50 is logged lands
# mid-run, and the resumed run crosses an epoch boundary.
PREEMPTIBLE = {"DATA": "synthetic", "EPOCHS": "2", "EXTRA_ARGS": "--input-shape 32 --classes 4 --samples 4096 "
               "--val-samples 256 --batch-size 8 --seed 0 --log-every 50 --no-progress"}
PREEMPTIBLE_STEPS = 512
SIGNAL_AFTER_STEP = 50


@functools.cache  # a module fixture that skips or fails is re-run for every test
def _cluster_problem() -> str | None:
    missing = [tool for tool in ("sinfo", "sbatch", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        return f"Slurm client tools not installed ({', '.join(missing)})"
    if os.geteuid() != 0:
        return "not root (the test cluster runs jobs as root and they write under pytest's tmp_path)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0:
        return f"no Slurm controller reachable: {out.stderr.strip()}"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    if any(states.get(node) not in ("idle", "mixed", "allocated") for node in NODES):
        return f"nodes {', '.join(NODES)} are not up (sinfo: {states or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem:
        message = f"{problem}; start the test cluster with: ci/slurm-cluster.sh start 2"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)


class Job:
    def __init__(self, job_id: str, log: Path, run_dir: Path):
        self.id, self.log, self.run_dir = job_id, log, run_dir

    def info(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no job log yet)"

    def wait(self, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; fail on any other final state or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info["JobState"] in states:
                return info
            assert info["JobState"] not in TERMINAL, f"job {self.id} ended {info['JobState']}:\n{self.text()}"
            assert time.monotonic() < deadline, f"job {self.id} not {states} after {timeout} s " \
                                                f"({info['JobState']}):\n{self.text()}"
            time.sleep(0.25)

    def wait_for_step(self, step: int, timeout: float) -> None:
        """Poll metrics.jsonl until the run has logged `step`, i.e. training is under way."""
        metrics, deadline = self.run_dir / "metrics.jsonl", time.monotonic() + timeout
        while not any(e.get("event") == "train" and e["step"] >= step for e in _events(metrics)):
            state = self.info()["JobState"]
            assert state not in TERMINAL, f"job {self.id} ended {state} before step {step}:\n{self.text()}"
            assert time.monotonic() < deadline, f"job {self.id} not at step {step} after {timeout} s:\n{self.text()}"
            time.sleep(0.1)


def _events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            pass
    return events


def sbatch(script: str, run_dir: Path, variables: dict[str, str]) -> Job:
    """Submit slurm/<script>.sbatch with its run dir and job log (<run_dir>.out) under pytest's tmp."""
    log = run_dir.with_suffix(".out")
    # base_env: one thread per process on every launcher (so their weights compare bit for bit),
    # ddp_train importable from the checkout, no SLURM_* of an enclosing allocation.
    # Single node under ddp-torchrun (the scripts' default), several under plain torchrun.
    launcher = "ddp_train.torchrun" if script == "single-node" else "torch.distributed.run"
    env = base_env(RUN_DIR=str(run_dir), DDP_TRAIN="python -m ddp_train",
                   TORCHRUN=f"python -m {launcher}", **variables)
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--job-name=test-{script}",
                          *FITS_CLUSTER[script], str(ROOT / "slurm" / f"{script}.sbatch")],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"sbatch {script} failed: {out.stderr}"
    return Job(out.stdout.strip().split(";")[0], log, run_dir)


def cancel(jobs: list[Job]) -> None:
    """Frees the cluster for the next test when one fails midway; a no-op for finished jobs."""
    for job in jobs:
        subprocess.run(["scancel", job.id], capture_output=True, timeout=30)


@pytest.fixture
def submit(cluster, tmp_path):
    jobs: list[Job] = []

    def _submit(script: str, variables: dict[str, str]) -> Job:
        jobs.append(sbatch(script, tmp_path / script, variables))
        return jobs[-1]

    yield _submit
    cancel(jobs)


def count(pattern: str, text: str) -> int:
    """Occurrences, not lines: output of two ranks can share a line."""
    return len(re.findall(pattern, text))


def assert_fit_log(text: str, launcher: str, runs: int = 1) -> None:
    assert count(rf"ddp_train: launcher={launcher} world_size=2 ", text) == runs, text
    assert count(r"ddp_train: ", text) == runs, text
    # Progress and epoch lines name their step, so each must appear exactly once, resumed or not.
    for line in re.findall(r"epoch \d+/\d+ step \d+\S* (?:train_)?loss", text):
        assert count(re.escape(line), text) == 1, text
    assert count(r"done: \d+ steps", text) == 1, text


def model_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Job:
    """An uninterrupted single-node run of the preemptible configuration."""
    job = sbatch("single-node", tmp_path_factory.mktemp("reference") / "run", PREEMPTIBLE)
    try:
        info = job.wait({"COMPLETED"}, timeout=240)
    finally:
        cancel([job])
    assert info["ExitCode"] == "0:0", job.text()
    return job


def test_single_node(reference):
    text = reference.text()
    assert_fit_log(text, "torchrun")
    assert count(rf"job {reference.id} restart 0 on n[12]: 2 processes", text) == 1, text
    assert count(rf"epoch 2/2 step {PREEMPTIBLE_STEPS} train_loss", text) == 1, text


@pytest.mark.parametrize(("script", "launcher", "topology"), [
    pytest.param("multi-node", "torchrun", r"on n\[1-2\]: 2 nodes x 1 processes", id="multi-node"),
    pytest.param("srun-ranks", "slurm", r"on n[12]: 2 ranks", id="srun-ranks"),
])
def test_fit(submit, script, launcher, topology):
    job = submit(script, SHORT)
    info = job.wait({"COMPLETED"}, timeout=240)
    text = job.text()
    assert info["ExitCode"] == "0:0", text
    assert_fit_log(text, launcher)
    assert count(rf"job {job.id} restart 0 {topology}", text) == 1, text
    assert count(r"epoch 1/1 step \d+ train_loss", text) == 1, text


@pytest.mark.parametrize(("script", "launcher", "scancel"), [
    # USR1 reaches every rank (--signal without B:); ddp_train runs with --preempt-signal USR1.
    pytest.param("srun-ranks", "slurm", ["--signal=USR1"], id="srun-ranks-USR1"),
    # SIGTERM reaches each node's torchrun, which forwards it to its workers.
    pytest.param("multi-node", "torchrun", ["--signal=TERM"], id="multi-node-TERM"),
    # torchrun is the batch shell itself (exec), so the signal goes to the batch step.
    pytest.param("single-node", "torchrun", ["--batch", "--signal=TERM"], id="single-node-TERM"),
])
def test_preempt_requeue_resume(submit, reference, script, launcher, scancel):
    job = submit(script, PREEMPTIBLE)
    job.wait_for_step(SIGNAL_AFTER_STEP, timeout=180)
    subprocess.run(["scancel", *scancel, job.id], check=True, timeout=30)

    info = job.wait({"PENDING"}, timeout=120)  # rank 0 requeued it once its checkpoint was durable
    assert info["Restarts"] == "1", job.text()
    time.sleep(2)  # Slurm revokes the old launch credential to the second: a rerun within it is refused
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], check=True, timeout=30)
    info = job.wait({"COMPLETED"}, timeout=240)

    text = job.text()
    assert info["ExitCode"] == "0:0", text
    preempted = re.findall(r"preempted: checkpoint \S+ at step (\d+); exiting with code 3", text)
    resumed = re.findall(r"resumed from \S+: epoch \d+, step (\d+) \(", text)
    assert len(preempted) == 1 and 0 < int(preempted[0]) < PREEMPTIBLE_STEPS, text
    assert resumed == preempted, text
    assert count(rf"job {job.id} restart 0 ", text) == 1 and count(rf"job {job.id} restart 1 ", text) == 1, text
    assert_fit_log(text, launcher, runs=2)
    assert count(rf"epoch 2/2 step {PREEMPTIBLE_STEPS} train_loss", text) == 1, text

    expected, got = model_of(reference.run_dir), model_of(job.run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed run's weights differ from the reference"


@pytest.mark.parametrize("script", ["single-node", "srun-ranks"])
def test_a_users_own_script(submit, script):
    """SCRIPT=...: the sbatch scripts run a user's Python script that calls ddp_train.fit."""
    job = submit(script, {"SCRIPT": str(ROOT / "tests" / "fixtures" / "train_script.py"),
                          "PYTHON": sys.executable, "PREEMPT_SIGNAL": "USR1" if script == "srun-ranks" else ""})
    info = job.wait({"COMPLETED"}, timeout=240)
    text = job.text()
    assert info["ExitCode"] == "0:0", text
    assert count(r"ddp_train: launcher=\w+ world_size=2 ", text) == 1, text
    assert count(r"script result: done at step 14", text) == 2, text  # each rank's fit() returns
    assert (job.run_dir / "checkpoints" / "last.pt").is_file()
