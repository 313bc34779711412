"""The shipped benchmark still runs end to end (it checks nothing about speed)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
COMMON = {"first_step_s", "exit_s", "wall_s", "peak_rss_mb"}


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """Every workload kind (torchrun throughput: digits; one process, step time: linreg), every tool
    that is importable, one tiny repeat."""
    report = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--repeats", "1",
                    "--workloads", "digits,linreg", "--procs", "1", "--quick", "--help-repeats", "1",
                    "--out", str(tmp_path), "--results", str(report)],
                   cwd=REPO, check=True, timeout=900)

    (results,) = tmp_path.glob("*/results.json")
    data = json.loads(results.read_text())
    assert {"started", "machine", "config", "commands", "runs", "summary", "help", "targets"} <= data.keys()
    tools = ["ddp_train", "raw"] + [t for t in ("lightning", "accelerate") if importlib.util.find_spec(t)]
    assert data["config"]["tools"] == tools
    assert [(r["workload"], r["tool"], r["procs"]) for r in data["runs"]] == [
        (w, t, 1) for w in ("digits", "linreg") for t in tools]
    for workload, rate in (("digits", "throughput"), ("linreg", "step_s")):
        cell = data["summary"][workload]["1"]
        for tool in tools:
            assert set(cell[tool]) == COMMON | {rate}
            assert all(v > 0 for v in cell[tool].values()), (workload, tool, cell[tool])
        assert set(cell["vs"]) == set(tools) - {"ddp_train"}
        assert cell["ratio"] == cell["vs"]["raw"]
    # The same computation: every tool's linreg ends at the same training loss.
    losses = {r["tool"]: _last_loss(r) for r in data["runs"] if r["workload"] == "linreg"}
    assert max(losses.values()) - min(losses.values()) < 1e-3 * max(losses.values()), losses
    for timing in data["help"].values():
        assert timing["median_s"] > 0
    assert {t["target"] for t in data["targets"]} == {
        "digits 1p throughput ratio", "digits 1p first step vs raw (s)",
        "linreg 1p whole command ratio", "linreg 1p steady step ratio",
        "`ddp-train --help` (s)", "`ddp-train fit --help` (s)"}
    text = report.read_text()
    assert "| digits | 1 | training throughput" in text and "| linreg | 1 | ms per step" in text
    absolute = re.findall(r"(?:^|[\s`'\"=(])(/[\w.-]+/\S*)", text, flags=re.M)
    assert not absolute, absolute  # paths are repo-relative (or relative to the current directory)


def _last_loss(run: dict) -> float:
    """The training loss of the run's last step: the last `train` event of the baselines (one per
    step), the last `eval` event of ddp-train (its train_loss: the mean over that one-step epoch)."""
    cmd = run["command"]
    if run["tool"] == "ddp_train":
        metrics = Path(cmd[cmd.index("--run-dir") + 1]) / "metrics.jsonl"
        event, key = "eval", "train_loss"
    else:
        metrics = Path(next(c for c in cmd if c.startswith("--metrics=")).split("=", 1)[1])
        event, key = "train", "loss"
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [e for e in events if e["event"] == event][-1][key]


def test_frameworks_are_optional(monkeypatch):
    import run

    real = importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None if name == "lightning" else real(name))
    tools, notes = run.available_tools("auto")
    assert "lightning" not in tools and tools[:2] == ["ddp_train", "raw"]
    assert notes[0].startswith("lightning: skipped")
    has_accelerate = real("accelerate") is not None  # installed or not, either is fine
    assert ("accelerate" in tools) == has_accelerate and len(notes) == 2 - has_accelerate
