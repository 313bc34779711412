"""A finished run ends promptly: the whole torchrun command exits soon after rank 0's `done:` line.

What a 2-rank `torchrun ... fit` spends between `done:` and its exit (2 CPUs, torch 2.14):
- torchrun's own share, which no worker can shorten: noticing the workers' exit (it polls every
  `--monitor-interval`, 0.1 s) and its own interpreter exit (~0.45 s: it imports torch too);
  0.57-0.9 s in all, more under load;
- each worker's: the final barrier, destroying the groups, and its interpreter exit.
The old teardown added a full gc.collect() (0.1-0.25 s) and a full interpreter exit (~0.45 s) on
every rank: 0.9-1.0 s over torchrun's share on a quiet machine, 2-4 s on a loaded one. Now: ~0.3 s.

A fixed bound on the whole figure would fail on a loaded machine whatever the code does, so the
test measures torchrun's share in the same test (a script that prints `done:` and ends with
os._exit) and bounds what ddp-train adds to it, best of three interleaved runs each.
"""

import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import BIN, ROOT, base_env

FLOOR = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        print("done: floor", file=sys.stderr, flush=True)
    os._exit(0)
""")
EXCESS_BOUND_S = 0.6  # old code: 0.94 s quiet (best of 4), 2.3 s at load 3; new: 0.3 s at load 3


def seconds_after_done(cmd: list[str], cwd) -> float:
    """Run `cmd`, return the seconds from the `done:` line on its stderr to its exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=base_env(), cwd=cwd)
    done, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("done:") and done is None:
            done = time.monotonic()
    code = proc.wait(timeout=120)
    end = time.monotonic()
    text = "".join(lines)
    assert code == 0 and done is not None, f"exit {code}:\n{text[-3000:]}"
    assert "terminate called" not in text, text[-3000:]
    return end - done


@pytest.mark.slow
def test_two_rank_run_exits_soon_after_done(tmp_path):
    floor_script = tmp_path / "floor.py"
    floor_script.write_text(FLOOR)
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
    floor, ours = [], []
    for i in range(3):
        floor.append(seconds_after_done([*torchrun, str(floor_script)], tmp_path))
        ours.append(seconds_after_done([*torchrun, "-m", "ddp_train", "fit", "--epochs", "1", "--no-progress",
                                        "--run-dir", str(tmp_path / f"run{i}")], ROOT))
    excess = min(ours) - min(floor)
    report = (f"done -> exit: ddp-train {' '.join(f'{t:.2f}' for t in ours)} s, torchrun floor "
              f"{' '.join(f'{t:.2f}' for t in floor)} s; best-of-3 excess {excess:.2f} s "
              f"(median {statistics.median(ours) - statistics.median(floor):.2f} s)")
    print(report)
    assert excess <= EXCESS_BOUND_S, report


@pytest.mark.slow
def test_ddp_train_torchrun_ends_sooner_and_keeps_exit_codes(tmp_path):
    """`python -m ddp_train.torchrun` is torchrun without its ~0.5 s interpreter exit: the same
    run ends sooner after `done:` (best of three, interleaved), and a failed worker's code is its exit code."""
    fit = ["--standalone", "--nproc_per_node=2", "-m", "ddp_train", "fit", "--epochs", "1", "--no-progress"]
    plain, quick = [], []
    for i in range(3):
        plain.append(seconds_after_done([str(BIN / "torchrun"), *fit, "--run-dir", str(tmp_path / f"p{i}")], ROOT))
        quick.append(seconds_after_done([sys.executable, "-m", "ddp_train.torchrun", *fit, "--run-dir",
                                         str(tmp_path / f"q{i}")], ROOT))
    report = f"done -> exit: torchrun {' '.join(f'{t:.2f}' for t in plain)} s, ddp_train.torchrun " \
             f"{' '.join(f'{t:.2f}' for t in quick)} s"
    print(report)
    assert min(quick) < min(plain), report
    failed = subprocess.run([sys.executable, "-m", "ddp_train.torchrun", *fit, "--epochs", "0"], capture_output=True,
                            text=True, env=base_env(), cwd=ROOT, timeout=240)
    assert failed.returncode == 2 and "error: --epochs must be >= 1 (got 0)" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr, failed.stderr  # the workers' code and line, no launcher report


def test_exit_process_closes_files_and_keeps_the_code(tmp_path):
    """exit_process skips the interpreter's teardown, not what it would have saved."""
    script = textwrap.dedent(f"""
        import gc, gzip, sys
        from ddp_train.dist import exit_process
        # The cycle below must still be alive at the exit: a collection before it finalises the
        # cycle's text wrapper and its buffer in no set order (CPython's, then "z" can be lost).
        # Whether one runs depended on the collector's allocation count after the imports.
        gc.disable()
        plain = open({str(tmp_path / 'plain.txt')!r}, "w")
        plain.write("x" * 10000)
        packed = gzip.open({str(tmp_path / 'packed.gz')!r}, "wt")
        packed.write("y" * 10000)
        class Node: pass
        node = Node(); node.me = node; node.f = open({str(tmp_path / 'cycle.txt')!r}, "w")
        node.f.write("z"); del node
        print("stdout kept", end="")
        exit_process(7)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=base_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "stdout kept"
    import gzip
    assert (tmp_path / "plain.txt").read_text() == "x" * 10000
    assert gzip.decompress((tmp_path / "packed.gz").read_bytes()).decode() == "y" * 10000
    assert (tmp_path / "cycle.txt").read_text() == "z"


def test_exit_process_waits_for_non_daemon_threads(tmp_path):
    script = textwrap.dedent(f"""
        import threading, time
        from ddp_train.dist import exit_process
        def late():
            time.sleep(0.5)
            open({str(tmp_path / 'late.txt')!r}, "w").write("written")
        threading.Thread(target=late).start()
        exit_process(5)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=base_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert (tmp_path / "late.txt").read_text() == "written"
