"""Benchmark `ddp-train fit` against a hand-written loop (and Lightning and Accelerate, if installed).

    .venv/bin/python benchmarks/run.py [--repeats 3] [--workloads cnn,digits,linreg] [--procs 1,2] [--quick]

Every tool runs the same workloads (benchmarks/common.py: the same data, model, global batch,
epochs, optimizer and learning rate): `cnn` and `digits` under `torchrun --standalone` (also at one
process, so launch costs are equal; ddp-train under its own `ddp-torchrun`, torchrun with a quick
exit), `linreg` (full-batch regression) as one plain process, with one thread per process
(OMP_NUM_THREADS=1), the tools interleaved (ddp-train, raw, ..., then the reverse order) so that
drift of a shared machine hits them alike. The baselines: raw_ddp.py /
raw_linreg.py (hand-written), lightning_fit.py and accelerate_fit.py (skipped, with a note, when
`lightning` / `accelerate` are not importable: they are no dependencies of ddp-train). Each run
gives: steady-state training throughput (cnn, digits) or seconds per step (linreg), and
launch-to-first-step time (both from the run's metrics.jsonl, the same events for every tool),
whole-command wall time and the exact peak RSS of every rank (ru_maxrss, recorded by
benchmarks/peak_rss.py, which every tool runs under). Medians and ratios (ddp-train / other tool)
go to benchmarks/RESULTS.md, everything raw to benchmarks/out/<stamp>/results.json.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: E402  (benchmarks/common.py)
from measure import rank_peaks_mb, steady_step_s, steady_throughput

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BASE_TOOLS = ("ddp_train", "raw")
FRAMEWORKS = {"lightning": "lightning_fit.py", "accelerate": "accelerate_fit.py"}  # optional baselines
TOOLS = BASE_TOOLS + tuple(FRAMEWORKS)

# name: how it launches, its headline metric, ddp-train's data/model flags, the baseline script,
# full and --quick sizes. Batch, epochs and learning rate come from benchmarks/common.py.
WORKLOADS = {
    "cnn": dict(launch="torchrun", rate="throughput",
                ddp=["--data", "synthetic", "--model", "cnn"], raw="raw_ddp.py",
                full=dict(samples=16384, epochs=1), quick=dict(samples=4096, epochs=1)),
    "digits": dict(launch="torchrun", rate="throughput",
                   ddp=["--data", "digits", "--model", "mlp", "--hidden", "128,64"], raw="raw_ddp.py",
                   full=dict(epochs=10), quick=dict(epochs=2)),
    # The classic full-batch regression: 50 Adam steps over 1M samples, one step per epoch.
    "linreg": dict(launch="python", rate="step_s",
                   ddp=["--data", "linreg", "--val-samples", "1000", "--lr", "0.1"], raw="raw_linreg.py",
                   full=dict(samples=1_000_000, epochs=50), quick=dict(samples=20_000, epochs=8)),
}
for _name, _spec in WORKLOADS.items():
    _spec.update(common.WORKLOADS[_name])
# The event that marks each step for the step_s metric. ddp-train logs `train` every --log-every
# steps (default 50), and evaluates and checkpoints after every epoch: with one step per epoch its
# `eval` events mark the steps (so its step time includes that epoch's evaluation and checkpoint).
STEP_EVENT = {"ddp_train": "eval"}


def available_tools(requested: str) -> tuple[list[str], list[str]]:
    """(tools to run, notes on the ones skipped)."""
    wanted = list(TOOLS) if requested == "auto" else [t for t in requested.split(",") if t]
    tools, notes = [], []
    for tool in wanted:
        if tool in FRAMEWORKS and importlib.util.find_spec(tool) is None:
            notes.append(f"{tool}: skipped (`import {tool}` fails; `pip install {tool}` to compare with it)")
        else:
            tools.append(tool)
    return tools, notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each tool per workload and world size")
    p.add_argument("--workloads", default="cnn,digits,linreg", help="comma-separated: " + ",".join(WORKLOADS))
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (torchrun --nproc_per_node); "
                   "linreg runs at 1 only")
    p.add_argument("--tools", default="auto", help="comma-separated: " + ",".join(TOOLS) + "; auto: "
                   "ddp_train, raw and whichever of lightning, accelerate is importable")
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
    unknown = [t for t in args.tools.split(",") if t and t not in TOOLS] if args.tools != "auto" else []
    if unknown or (args.tools != "auto" and not set(BASE_TOOLS) <= set(args.tools.split(","))):
        p.error(f"--tools: choose from {', '.join(TOOLS)}, with ddp_train and raw (got {args.tools})")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.results is None and not args.quick:
        args.results = HERE / "RESULTS.md"
    return args


def cells(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(workload, procs) pairs to run: linreg is one plain process."""
    return [(w, n) for w in args.workloads for n in args.procs
            if WORKLOADS[w]["launch"] == "torchrun" or n == 1]


def bench_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WANDB_MODE", None)
    return env


def command(tool: str, workload: str, procs: int, run_dir: Path, quick: bool, log_every: int,
            rss_dir: Path) -> list[str]:
    """Every rank's program is peak_rss.py, which runs the tool and records its peak RSS; under
    torchrun for cnn and digits, alone for linreg."""
    spec = WORKLOADS[workload]
    size = spec["quick" if quick else "full"]
    if spec["launch"] == "torchrun":
        # Each tool under its own launcher: ddp-train's is ddp-torchrun (torchrun, minus torchrun's
        # ~0.5 s interpreter exit), the others' plain torchrun.
        launcher = "ddp_train.torchrun" if tool == "ddp_train" else "torch.distributed.run"
        launch = [PY, "-m", launcher, "--standalone", f"--nproc_per_node={procs}",
                  "--no-python", PY, str(HERE / "peak_rss.py"), str(rss_dir), PY]
    else:
        launch = [PY, str(HERE / "peak_rss.py"), str(rss_dir), PY]
    if tool != "ddp_train":
        script = spec["raw"] if tool == "raw" else FRAMEWORKS[tool]
        every = 1 if spec["rate"] == "step_s" else log_every  # step_s: one event per step
        args = [f"--{k}={v}" for k, v in size.items()] + [f"--log-every={every}",
                                                          f"--metrics={run_dir / 'metrics.jsonl'}"]
        if script != "raw_linreg.py":  # the others run several workloads
            args = [f"--workload={workload}", *args]
        if tool in FRAMEWORKS:
            args.append(f"--run-dir={run_dir}")
        return [*launch, str(HERE / script), *args]
    sizes = [x for k, v in size.items() for x in (f"--{k}", str(v))]
    logging = [] if spec["rate"] == "step_s" else ["--log-every", str(log_every)]
    batch = spec["global_batch"] // procs
    if spec["rate"] == "step_s":  # full batch: all the samples
        batch = min(batch, size["samples"])
    return [*launch, "-m", "ddp_train", "fit", *spec["ddp"], *sizes,
            "--batch-size", str(batch), "--eval-batch-size", str(4 * batch),  # as the baselines evaluate
            *logging, "--run-dir", str(run_dir), "--resume", "never", "--no-progress"]


def compile_bytecode() -> None:
    """.pyc files for ddp_train and the baselines' shared modules, as every install has them (pip
    compiles at install, an editable install at first import), unless PYTHONDONTWRITEBYTECODE is
    set, as on this machine: then each launch would compile ~60 ms of ddp_train per rank."""
    for folder in (REPO / "ddp_train", HERE):
        compileall.compile_dir(folder, quiet=1)


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
    end = next(e["time"] for e in reversed(events) if e["event"] == "end")
    ranks = rank_peaks_mb(rss_dir, procs)
    out = {"tool": tool, "workload": workload, "procs": procs, "wall_s": wall,
           "first_step_s": first - t0, "exit_s": t0 + wall - end, "steps": max(e.get("step", 0) for e in events),
           "peak_rss_mb": max(ranks), "rank_peak_rss_mb": ranks, "command": cmd}
    if WORKLOADS[workload]["rate"] == "throughput":
        rate = steady_throughput(events)
        out.update(throughput=rate["median"], throughput_mean=rate["mean"], throughput_windows=rate["windows"])
    else:
        step = steady_step_s(events, STEP_EVENT.get(tool, "train"))
        out.update(step_s=step["median"], step_s_mean=step["mean"], step_s_steps=step["steps"])
    return out


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


def metrics(workload: str) -> tuple[str, ...]:
    return (WORKLOADS[workload]["rate"], "first_step_s", "exit_s", "wall_s", "peak_rss_mb")


def summarize(runs: list[dict]) -> dict:
    """summary[workload][procs] = {tool: {metric: median over repeats}, "ratio": {metric: median over
    repeats of ddp_train / raw}, "diff": {metric: median of ddp_train - raw}, "vs": {tool:
    {metric: median of ddp_train / tool}} for every other tool}. Ratios and differences are taken
    within each repeat's runs (adjacent in time), then the median: drift of a shared machine
    between repeats cancels."""
    summary: dict = {}
    for r in runs:
        cell = summary.setdefault(r["workload"], {}).setdefault(str(r["procs"]), {"pairs": {}})
        cell["pairs"].setdefault(r["repeat"], {})[r["tool"]] = r
    for workload, by_procs in summary.items():
        names = metrics(workload)
        for cell in by_procs.values():
            repeats = list(cell.pop("pairs").values())
            tools = [t for t in TOOLS if any(t in rep for rep in repeats)]
            for tool in tools:
                cell[tool] = {m: statistics.median(rep[tool][m] for rep in repeats if tool in rep) for m in names}
            cell["vs"] = {}
            for tool in tools:
                if tool == "ddp_train":
                    continue
                pairs = [rep for rep in repeats if "ddp_train" in rep and tool in rep]
                cell["vs"][tool] = {m: statistics.median(p["ddp_train"][m] / p[tool][m] for p in pairs)
                                    for m in names}
                if tool == "raw":
                    cell["ratio"] = cell["vs"]["raw"]
                    cell["diff"] = {m: statistics.median(p["ddp_train"][m] - p["raw"][m] for p in pairs)
                                    for m in names}
    return summary


def check_targets(summary: dict, helps: dict) -> list[dict]:
    out = []

    def target(name: str, value: float, ok: bool, goal: str) -> None:
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})

    for workload, cells in summary.items():
        for procs, c in cells.items():
            r = c["ratio"]
            where = f"{workload} {procs}p"
            if workload == "linreg":
                target(f"{where} whole command ratio", r["wall_s"], r["wall_s"] <= 1.3, "<= 1.30x")
                target(f"{where} steady step ratio", r["step_s"], r["step_s"] <= 1.2, "<= 1.20x")
                continue  # first step: both tools generate the same 1M samples first; not a target
            target(f"{where} throughput ratio", r["throughput"], r["throughput"] >= 1.0, ">= 1.00x")
            if workload == "cnn":
                target(f"{where} peak RSS ratio", r["peak_rss_mb"], r["peak_rss_mb"] <= 1.05, "<= 1.05x")
            extra = c["diff"]["first_step_s"]
            target(f"{where} first step vs raw (s)", extra, extra <= 0.3, "<= +0.30 s")
            if int(procs) > 1:
                exit_s = c["ddp_train"]["exit_s"]
                target(f"{where} exit after the end event (s)", exit_s, exit_s <= 0.5, "<= 0.50 s")
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
    tools, skipped = available_tools(args.tools)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out / stamp).resolve()
    log_every = 5 if args.quick else 10
    started = datetime.datetime.now().astimezone()
    facts = machine()
    print(f"benchmark: {facts['nproc']} CPUs ({facts['cpu']}), torch {facts['torch']}; tools {', '.join(tools)}; "
          f"outputs in {out}")
    for note in skipped:
        print(f"  {note}")

    compile_bytecode()
    if not args.quick:  # untimed warm-up of every tool: page cache
        for tool in tools:
            run_once(tool, "digits", 1, f"warmup-{tool}", out, True, 5)

    runs: list[dict] = []
    failures: list[dict] = []
    for rep in range(args.repeats):
        order = tools if rep % 2 == 0 else tools[::-1]
        for workload, procs in cells(args):
            for tool in order:
                r = run_retrying(tool, workload, procs, f"{workload}-{procs}p-{tool}-{rep}", out,
                                 args.quick, log_every, failures=failures)
                r["repeat"] = rep
                runs.append(r)
                rate = (f"{r['throughput']:8.0f} samples/s" if "throughput" in r
                        else f"{r['step_s'] * 1e3:7.1f} ms/step")
                print(f"  [{rep + 1}/{args.repeats}] {workload:6} {procs}p {tool:10} {rate}  first step "
                      f"{r['first_step_s']:5.2f} s  wall {r['wall_s']:5.2f} s  peak RSS/rank "
                      f"{r['peak_rss_mb']:6.0f} MB", flush=True)

    helps = help_timings(args.help_repeats)
    facts["loadavg_at_end"] = os.getloadavg()
    facts["minutes"] = round((datetime.datetime.now().astimezone() - started).total_seconds() / 60, 1)
    summary = summarize(runs)
    targets = check_targets(summary, helps)
    result = {"started": started.isoformat(timespec="seconds"), "machine": facts,
              "config": {"repeats": args.repeats, "workloads": args.workloads, "procs": args.procs,
                         "tools": tools, "skipped": skipped, "quick": args.quick, "log_every": log_every,
                         "help_repeats": args.help_repeats},
              "commands": {f"{w} {p}p {t}": command(t, w, p, Path("RUN_DIR"), args.quick, log_every, Path("RSS_DIR"))
                           for w, p in cells(args) for t in tools},
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
