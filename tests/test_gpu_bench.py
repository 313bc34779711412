"""benchmarks/gpu_bench.py runs (its CPU dry run, tiny sizes) and skips cleanly without a GPU."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, base_env

BENCH = str(ROOT / "benchmarks" / "gpu_bench.py")


def test_gpu_bench_skips_without_cuda():
    proc = subprocess.run([sys.executable, BENCH], capture_output=True, text=True, timeout=120,
                          env=base_env(CUDA_VISIBLE_DEVICES=""), cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("gpu_bench: skipped: no CUDA GPU visible"), proc.stderr


def test_gpu_bench_dry_run_compares_ddp_train_with_the_raw_loop(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, BENCH, "--dry-run", "--only", "gpt", "--steps", "4", "--out", str(out)],
                   check=True, timeout=600, env=base_env(), cwd=ROOT)
    data = json.loads(out.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    eager = rows["gpt_bf16_eager"]
    assert eager["unit"] == "tokens/s" and eager["ddp_train"] > 0 and eager["raw"] > 0
    assert eager["ratio"] == pytest.approx(eager["ddp_train"] / eager["raw"], rel=0.01)
    assert eager["ddp_train_mfu"] > 0 and eager["raw_mfu"] > 0 and data["bf16_gemm_peak_tflops"] >= 0
    assert "skip" in rows["gpt_bf16_compile"]
