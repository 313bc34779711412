"""One run per run directory: the lock file, its holder, its takeover, and a second run refused."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import base_env, run_fit
from ddp_train.errors import UsageError
from ddp_train.runlock import LOCK_NAME, WAIT_S, RunLock


def _holder(run_dir, **fields):
    """A lock file as another run leaves it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"program": "ddp-train", "host": socket.gethostname(), "pid": os.getpid(), "launch": None,
              "slurm_job": None, "since": time.time(), **fields}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_with_one_line_naming_the_first(tmp_path):
    first = RunLock(tmp_path / "x", "launch-a", "123")
    first.acquire()
    with pytest.raises(UsageError) as e:
        RunLock(tmp_path / "x", "launch-b").acquire()
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'x'} is in use by ddp-train pid {os.getpid()} on "
                              f"{socket.gethostname()} (Slurm job 123) since ")
    assert message.endswith("; wait for it, or use another --run-dir")
    first.release()
    assert not (tmp_path / "x" / LOCK_NAME).exists()
    again = RunLock(tmp_path / "x", "launch-b")
    again.acquire()  # free once released
    again.release()


def test_dead_holder_on_this_host_is_taken_over(tmp_path):
    _holder(tmp_path, pid=_dead_pid())
    lock = RunLock(tmp_path, None)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_live_holder_elsewhere_is_kept_until_its_heartbeat_is_stale(tmp_path):
    _holder(tmp_path, host="node7", pid=_dead_pid())  # a pid on another host says nothing
    with pytest.raises(UsageError, match="in use by ddp-train pid .* on node7"):
        RunLock(tmp_path, None, stale_s=60).acquire()
    old = time.time() - 61
    os.utime(tmp_path / LOCK_NAME, (old, old))  # its heartbeat stopped a minute ago
    lock = RunLock(tmp_path, None, stale_s=60)
    lock.acquire()
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, None, heartbeat_s=0.05)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (old, old))
    deadline = time.monotonic() + 30
    while os.stat(tmp_path / LOCK_NAME).st_mtime < old + 500:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.02)
    lock.release()


def test_requeued_job_waits_for_its_predecessor(tmp_path):
    _holder(tmp_path, host="node7", launch="4242", slurm_job="4242")  # still exiting on another node
    released = threading.Event()

    def predecessor_exits():
        (tmp_path / LOCK_NAME).unlink()
        released.set()

    threading.Timer(0.3, predecessor_exits).start()
    lock = RunLock(tmp_path, "4242", "4242", wait_s=60)
    lock.acquire()
    assert released.is_set()  # it waited for the release rather than take the live holder's lock
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_requeued_job_waits_a_bounded_time(tmp_path):
    _holder(tmp_path, host="node7", launch="4242", slurm_job="4242")
    with pytest.raises(UsageError, match=r"\(Slurm job 4242\)"):
        RunLock(tmp_path, "4242", "4242", wait_s=0.2).acquire()


def test_only_one_of_many_contenders_wins(tmp_path):
    wins, errors = [], []

    def contend():
        try:
            RunLock(tmp_path, None).acquire()
            wins.append(1)
        except UsageError as e:
            errors.append(e)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(errors) == 7


def test_second_fit_fails_at_once_and_touches_nothing(tmp_path, tiny):
    holder = _holder(tmp_path / "run", slurm_job="123")  # this test process holds the run directory
    start = time.monotonic()
    proc = run_fit(1, *tiny("run"), check=False, env=base_env())
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < WAIT_S / 2  # at once: not after waiting for the holder (WAIT_S, ~2 min)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {tmp_path / 'run'} is in use by ddp-train pid {os.getpid()} on {holder['host']} "
                     f"(Slurm job 123) since {time.strftime('%H:%M', time.localtime(holder['since']))}; "
                     "wait for it, or use another --run-dir"]
    assert sorted(os.listdir(tmp_path / "run")) == [LOCK_NAME]
