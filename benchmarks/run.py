"""Benchmark `ddp-train fit` against the hand-written DDP loop (benchmarks/raw_ddp.py).

    .venv/bin/python benchmarks/run.py [--repeats 3] [--workloads cnn,digits] [--procs 1,2] [--quick]

Both tools run the same workloads under `torchrun --standalone` (also at one process, so launch
costs are equal), one thread per process (OMP_NUM_THREADS=1), interleaved in ABBA order
(ddp-train, raw, raw, ddp-train, ...) so that drift of a shared machine hits both alike. Each run
gives: steady-state training throughput and launch-to-first-step time (both from the run's
metrics.jsonl, the same events for both tools), whole-command wall time and the exact peak RSS of
every rank (ru_maxrss, recorded by benchmarks/peak_rss.py, which torchrun starts as each rank's
program for both tools). Medians and ratios (ddp-train / raw) go
to benchmarks/RESULTS.md, everything raw to benchmarks/out/<stamp>/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import rank_peaks_mb, steady_throughput

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
TOOLS = ("ddp_train", "raw")

# name: global batch, ddp-train data/model flags, raw_ddp.py flags, full and --quick sizes
WORKLOADS = {
    "cnn": dict(global_batch=128,
                ddp=["--data", "synthetic", "--model", "cnn"], raw=["--workload", "cnn"],
                full=dict(samples=16384, epochs=1), quick=dict(samples=4096, epochs=1)),
    "digits": dict(global_batch=64,
                   ddp=["--data", "digits", "--model", "mlp", "--hidden", "128,64"],
                   raw=["--workload", "digits"],
                   full=dict(epochs=10), quick=dict(epochs=2)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each tool per workload and world size")
    p.add_argument("--workloads", default="cnn,digits", help="comma-separated: " + ",".join(WORKLOADS))
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (torchrun --nproc_per_node)")
    p.add_argument("--quick", action="store_true", help="smaller workloads (smoke test, not a measurement)")
    p.add_argument("--help-repeats", type=int, default=7, help="runs of each --help timing")
    p.add_argument("--out", type=Path, default=HERE / "out", help="raw outputs go to OUT/<stamp>/")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown report (default: benchmarks/RESULTS.md; none with --quick)")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.procs = [int(n) for n in args.procs.split(",") if n]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
        for n in args.procs:
            if n < 1 or WORKLOADS[w]["global_batch"] % n:
                p.error(f"--procs {n}: the {w} global batch {WORKLOADS[w]['global_batch']} must split evenly")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.results is None and not args.quick:
        args.results = HERE / "RESULTS.md"
    return args


def bench_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WANDB_MODE", None)
    return env


def command(tool: str, workload: str, procs: int, run_dir: Path, quick: bool, log_every: int,
            rss_dir: Path) -> list[str]:
    """torchrun starts peak_rss.py as each rank's program; it runs the tool and records its peak RSS."""
    spec = WORKLOADS[workload]
    size = spec["quick" if quick else "full"]
    launch = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
              "--no-python", PY, str(HERE / "peak_rss.py"), str(rss_dir), PY]
    if tool == "raw":
        sizes = [f"--{k}={v}" for k, v in size.items()]
        return [*launch, str(HERE / "raw_ddp.py"), *spec["raw"], *sizes, f"--log-every={log_every}",
                f"--metrics={run_dir / 'metrics.jsonl'}"]
    sizes = [x for k, v in size.items() for x in (f"--{k}", str(v))]
    return [*launch, "-m", "ddp_train", "fit", *spec["ddp"], *sizes,
            "--batch-size", str(spec["global_batch"] // procs), "--log-every", str(log_every),
            "--run-dir", str(run_dir), "--resume", "never", "--no-progress"]


def run_once(tool: str, workload: str, procs: int, name: str, out: Path, quick: bool,
             log_every: int) -> dict:
    """Launch one run, wait, and read what it wrote: metrics.jsonl and each rank's peak RSS."""
    run_dir, rss_dir, log_dir = out / "runs" / name, out / "rss" / name, out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(tool, workload, procs, run_dir, quick, log_every, rss_dir)
    with open(log_dir / f"{name}.out", "w") as stdout, open(log_dir / f"{name}.err", "w") as stderr:
        t0 = time.time()
        code = subprocess.run(cmd, cwd=REPO, env=bench_env(), stdout=stdout, stderr=stderr).returncode
        wall = time.time() - t0
    if code != 0:
        tail = (log_dir / f"{name}.err").read_text()[-3000:]
        raise RunFailed(f"run failed (exit {code}): {' '.join(cmd)}\n--- stderr tail ---\n{tail}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    first = next(e["time"] for e in events if e["event"] == "first_step")
    ranks = rank_peaks_mb(rss_dir, procs)
    rate = steady_throughput(events)
    return {"tool": tool, "workload": workload, "procs": procs, "wall_s": wall,
            "first_step_s": first - t0, "throughput": rate["median"],
            "throughput_mean": rate["mean"], "throughput_windows": rate["windows"],
            "steps": max(e.get("step", 0) for e in events), "peak_rss_mb": max(ranks),
            "rank_peak_rss_mb": ranks, "command": cmd}


class RunFailed(RuntimeError):
    pass


def run_retrying(*args, failures: list[dict]) -> dict:
    """One run; a crashed run is logged in `failures` and run again once (a shared machine, and
    torch's teardown at exit, can fail a run that trained fine)."""
    try:
        return run_once(*args)
    except RunFailed as e:
        failures.append({"run": args[3], "error": str(e)})
        print(f"  {args[3]} failed; running it again (error in results.json)\n{str(e)[-600:]}", flush=True)
        return run_once(*args[:3], args[3] + "-retry", *args[4:])


def time_command(cmd: list[str], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=bench_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs_s": times, "command": cmd}


def help_timings(repeats: int) -> dict:
    script = Path(PY).parent / "ddp-train"
    cli = [str(script)] if script.exists() else [PY, "-m", "ddp_train"]
    return {"ddp-train --help": time_command([*cli, "--help"], repeats),
            "ddp-train fit --help": time_command([*cli, "fit", "--help"], repeats),
            "python -c 'import torch'": time_command([PY, "-c", "import torch"], repeats),
            "python -c pass": time_command([PY, "-c", "pass"], repeats)}


METRICS = ("throughput", "first_step_s", "wall_s", "peak_rss_mb")


def summarize(runs: list[dict]) -> dict:
    """summary[workload][procs] = {tool: {metric: median over repeats}, "ratio": {metric: median over
    repeats of ddp_train / raw}, "diff": {metric: median of ddp_train - raw}}. Ratios and differences
    are taken within each repeat's adjacent pair of runs, then the median: drift of a shared
    machine between repeats cancels."""
    summary: dict = {}
    for r in runs:
        cell = summary.setdefault(r["workload"], {}).setdefault(str(r["procs"]), {"pairs": {}})
        cell["pairs"].setdefault(r["repeat"], {})[r["tool"]] = r
    for cells in summary.values():
        for cell in cells.values():
            pairs = [p for p in cell.pop("pairs").values() if len(p) == len(TOOLS)]
            for tool in TOOLS:
                cell[tool] = {m: statistics.median(p[tool][m] for p in pairs) for m in METRICS}
            cell["ratio"] = {m: statistics.median(p["ddp_train"][m] / p["raw"][m] for p in pairs)
                             for m in METRICS}
            cell["diff"] = {m: statistics.median(p["ddp_train"][m] - p["raw"][m] for p in pairs)
                            for m in METRICS}
    return summary


def check_targets(summary: dict, helps: dict) -> list[dict]:
    out = []

    def target(name: str, value: float, ok: bool, goal: str) -> None:
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})

    for workload, cells in summary.items():
        for procs, c in cells.items():
            r = c["ratio"]
            where = f"{workload} {procs}p"
            if workload == "cnn":
                target(f"{where} throughput ratio", r["throughput"], r["throughput"] >= 1.0, ">= 1.00x")
                target(f"{where} peak RSS ratio", r["peak_rss_mb"], r["peak_rss_mb"] <= 1.05, "<= 1.05x")
            if workload == "digits":
                target(f"{where} throughput ratio", r["throughput"], r["throughput"] >= 1.5, ">= 1.50x")
            extra = c["diff"]["first_step_s"]
            target(f"{where} first step vs raw (s)", extra, extra <= 0.5, "<= +0.50 s")
    for name in ("ddp-train --help", "ddp-train fit --help"):
        target(f"`{name}` (s)", helps[name]["median_s"], helps[name]["median_s"] < 0.5, "< 0.50 s")
    return out


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out / stamp).resolve()
    log_every = 5 if args.quick else 10
    started = datetime.datetime.now().astimezone()
    facts = machine()
    print(f"benchmark: {facts['nproc']} CPUs ({facts['cpu']}), torch {facts['torch']}; outputs in {out}")

    if not args.quick:  # untimed warm-up of both tools: page cache, .pyc files
        for tool in TOOLS:
            run_once(tool, "digits", 1, f"warmup-{tool}", out, True, 5)

    runs: list[dict] = []
    failures: list[dict] = []
    for rep in range(args.repeats):
        order = TOOLS if rep % 2 == 0 else TOOLS[::-1]
        for workload in args.workloads:
            for procs in args.procs:
                for tool in order:
                    r = run_retrying(tool, workload, procs, f"{workload}-{procs}p-{tool}-{rep}", out,
                                     args.quick, log_every, failures=failures)
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"  [{rep + 1}/{args.repeats}] {workload:6} {procs}p {tool:9} "
                          f"{r['throughput']:8.0f} samples/s  first step {r['first_step_s']:5.2f} s  "
                          f"wall {r['wall_s']:5.2f} s  peak RSS/rank {r['peak_rss_mb']:6.0f} MB", flush=True)

    helps = help_timings(args.help_repeats)
    facts["loadavg_at_end"] = os.getloadavg()
    facts["minutes"] = round((datetime.datetime.now().astimezone() - started).total_seconds() / 60, 1)
    summary = summarize(runs)
    targets = check_targets(summary, helps)
    result = {"started": started.isoformat(timespec="seconds"), "machine": facts,
              "config": {"repeats": args.repeats, "workloads": args.workloads, "procs": args.procs,
                         "quick": args.quick, "log_every": log_every, "help_repeats": args.help_repeats},
              "commands": {f"{w} {p}p {t}": command(t, w, p, Path("RUN_DIR"), args.quick, log_every, Path("RSS_DIR"))
                           for w in args.workloads for p in args.procs for t in TOOLS},
              "runs": runs, "failures": failures, "summary": summary, "help": helps, "targets": targets}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['value']:.3f} (target {t['goal']})")
    if args.results:
        from report import markdown
        args.results.write_text(markdown(result, out))
        print(f"wrote {args.results}")
    print(f"raw results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
