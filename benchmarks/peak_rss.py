"""Run a command and record its exact peak resident set size (the kernel's ru_maxrss, from wait4).

    python benchmarks/peak_rss.py OUT_DIR COMMAND [ARGS...]

benchmarks/run.py makes this every torchrun rank's program, for both tools alike, so each rank's
peak is counted over its whole life, exit included, with no polling. Writes
OUT_DIR/rank-<RANK>.json = {"rank", "maxrss_kb", "exit_code"}; exits with the command's code.
"""

import json
import os
import signal
import subprocess
import sys


def main() -> None:
    out_dir, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(cmd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    _, status, usage = os.wait4(proc.pid, 0)  # retried by Python if a forwarded signal interrupts it
    code = os.waitstatus_to_exitcode(status)
    rank = os.environ.get("RANK", "0")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "maxrss_kb": usage.ru_maxrss, "exit_code": code}, f)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
