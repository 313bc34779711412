"""The shipped benchmark still runs end to end (it checks nothing about speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METRICS = {"throughput", "first_step_s", "wall_s", "peak_rss_mb"}


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    report = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--repeats", "1",
                    "--workloads", "digits", "--procs", "1", "--quick", "--help-repeats", "1",
                    "--out", str(tmp_path), "--results", str(report)],
                   cwd=REPO, check=True, timeout=600)

    (results,) = tmp_path.glob("*/results.json")
    data = json.loads(results.read_text())
    assert {"started", "machine", "config", "commands", "runs", "summary", "help", "targets"} <= data.keys()
    assert [(r["tool"], r["procs"]) for r in data["runs"]] == [("ddp_train", 1), ("raw", 1)]
    cell = data["summary"]["digits"]["1"]
    for tool in ("ddp_train", "raw", "ratio"):
        assert set(cell[tool]) == METRICS
        assert all(v > 0 for v in cell[tool].values()), (tool, cell[tool])
    for timing in data["help"].values():
        assert timing["median_s"] > 0
    assert {t["target"] for t in data["targets"]} == {
        "digits 1p throughput ratio", "digits 1p first step vs raw (s)",
        "`ddp-train --help` (s)", "`ddp-train fit --help` (s)"}
    assert "| digits | 1 | training throughput" in report.read_text()
