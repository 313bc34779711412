"""What benchmarks/run.py measures, the same way for both tools: steady-state throughput from a
run's metrics.jsonl events, and each rank's peak RSS as recorded by benchmarks/peak_rss.py."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def steady_throughput(events: list[dict]) -> dict[str, float]:
    """Global training samples/s over the windows between consecutive `train` events that lie
    inside one epoch with no evaluation in them. The first window starts at the first logged step,
    so the first --log-every steps (allocator, autograd and DDP bucket warm-up) never count.

    `median` (the headline figure) is the median of the windows' rates: on a shared machine a
    window in which another process took the CPU is an outlier, not a trend. `mean` is all the
    windows' samples over all their seconds."""
    train = [e for e in events if e["event"] == "train"]
    evals = [e["time"] for e in events if e["event"] == "eval"]
    windows = [(b["samples"] - a["samples"], b["time"] - a["time"]) for a, b in zip(train, train[1:])
               if a["epoch"] == b["epoch"] and not any(a["time"] < t <= b["time"] for t in evals)]
    if not windows or any(dt <= 0 for _, dt in windows):
        raise ValueError("no steady-state window: need two `train` events within one epoch "
                         "(lower --log-every or train longer)")
    return {"median": statistics.median(n / dt for n, dt in windows),
            "mean": sum(n for n, _ in windows) / sum(dt for _, dt in windows),
            "windows": len(windows)}


def steady_step_s(events: list[dict], event: str, warmup: int = 10) -> dict[str, float]:
    """Seconds per step from the times of one `event` per step (e.g. `train` with --log-every 1,
    or `eval` when every epoch is one step), skipping the first `warmup` steps (fewer on short
    runs: a quarter of them at most). `median` is the headline figure, as for throughput."""
    times = [e["time"] for e in events if e["event"] == event]
    skip = min(warmup, len(times) // 4)
    gaps = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    if not gaps:
        raise ValueError(f"no steady-state step: need at least two `{event}` events after warm-up")
    return {"median": statistics.median(gaps), "mean": sum(gaps) / len(gaps), "steps": len(gaps)}


def rank_peaks_mb(rss_dir: Path, world_size: int) -> list[float]:
    """Peak RSS of every rank in MB (MiB), rank order."""
    peaks = []
    for rank in range(world_size):
        record = json.loads((rss_dir / f"rank-{rank}.json").read_text())
        peaks.append(record["maxrss_kb"] / 1024)
    return peaks
