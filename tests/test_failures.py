"""No hangs: a failure on rank 1 alone ends every rank, non-zero, for each launch style: torchrun's agent
ends the others itself; without an agent (Slurm steps, ranks started by hand) the watchdog does it."""

import re
import subprocess
import time

import pytest

from conftest import ROOT, base_env, fit_cmd, free_port

pytestmark = pytest.mark.slow
FAIL = ["--model", "tests.fixtures.userdefs:fail_on_rank1"]


def _rank_env(style):
    """Environment of each of two ranks: an srun step's variables, or RANK/WORLD_SIZE set by hand."""
    port = str(free_port())

    def env(rank):
        if style == "slurm":
            return base_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                            SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                            SLURM_STEP_NODELIST="127.0.0.1", SLURM_JOB_ID=port, MASTER_PORT=port)
        return base_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
    return env


def _launch_pair(tiny_opts, make_env):
    """Two single-process launches that find each other through environment variables only."""
    procs = [subprocess.Popen(fit_cmd(1, *tiny_opts), env=make_env(rank), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    return procs


def _wait_all(procs, timeout=120):
    """(exit codes, seconds between the first and the last exit, combined stderr)."""
    start, exits = time.monotonic(), {}
    while len(exits) < len(procs):
        for i, p in enumerate(procs):
            if i not in exits and p.poll() is not None:
                exits[i] = time.monotonic()
        if time.monotonic() - start > timeout:
            for p in procs:
                p.kill()
            raise AssertionError(f"ranks still running after {timeout}s: a hang")
        time.sleep(0.05)
    err = "".join(p.stderr.read() for p in procs)
    return [p.returncode for p in procs], max(exits.values()) - min(exits.values()), err


def test_torchrun_rank1_failure_fails_the_job_naming_rank1(tiny):
    """Under torchrun the agent ends rank 0 (SIGTERM) once rank 1 exits: this checks that the job
    fails, names rank 1 as the root cause and prints its error, not the watchdog (which the
    launches without an agent below exercise)."""
    start = time.monotonic()
    proc = subprocess.run(fit_cmd(2, *tiny("tr", *FAIL)), env=base_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    print(f"torchrun: all ranks down {time.monotonic() - start:.1f}s after launch")
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 1 ", root_cause), proc.stderr[-3000:]


@pytest.mark.parametrize("style", ["slurm", "by-hand"])
def test_env_launched_rank1_failure_ends_all_ranks(tiny, style):
    codes, spread, err = _wait_all(_launch_pair(tiny(style, *FAIL), _rank_env(style)))
    print(f"{style}: last rank exited {spread:.2f}s after the first; codes {codes}")
    assert all(c != 0 for c in codes), (codes, err)
    assert spread < 60
    assert "[rank 1] crashed" in err and "injected failure on rank 1" in err
    assert "error: [rank 0] stopping: " in err


@pytest.mark.parametrize("style", ["slurm", "by-hand"])
def test_env_launched_pair_trains(tiny, style):
    """The same launch styles, without a failure, train to the end."""
    codes, _, err = _wait_all(_launch_pair(tiny(style, "--max-steps", "6"), _rank_env(style)))
    assert codes == [0, 0], err
    launcher = "slurm" if style == "slurm" else "env"
    assert err.count(f"ddp_train: launcher={launcher} world_size=2") == 1
