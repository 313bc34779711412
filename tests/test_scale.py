"""Scale: FSDP2 against DDP, sharded checkpoints (exact resume, export, the tools), and resuming on
another number of processes with a fixed global batch. Real torchrun processes over gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_env, run_fit
from ddp_train.checkpoint import sharded
from ddp_train.models import build_model

pytestmark = pytest.mark.slow

# 250 samples: with a global batch of 32 the epoch's tail is padded (8 steps an epoch, 6 repeats).
OPTS = ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "250", "--val-samples", "101",
        "--model", "mlp", "--hidden", "32,16", "--log-every", "4", "--no-progress", "--seed", "3"]
GLOBAL = ["--global-batch-size", "32", "--batch-size", "16"]


def model_of(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    ckpts = run_dir / "checkpoints"
    if (ckpts / name).is_dir():
        return sharded.export(ckpts / name)
    return torch.load(ckpts / f"{name}.pt", weights_only=True, map_location="cpu")["model"]


def step_of(run_dir: Path) -> int:
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last").is_dir():
        return sharded.read_extra(ckpts / "last")["step"]
    return torch.load(ckpts / "last.pt", weights_only=True, map_location="cpu")["step"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_trains_like_ddp_and_resumes_exactly(tmp_path):
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    run_fit(2, *OPTS, *GLOBAL, "--epochs", "3", "--strategy", "ddp", "--run-dir", str(ddp))
    proc = run_fit(2, *OPTS, *GLOBAL, "--epochs", "3", "--strategy", "fsdp", "--run-dir", str(fsdp), "--save-every",
                   "4", "--keep", "10", "--clip-grad-norm", "100")
    assert "strategy=fsdp" in proc.stderr
    diff = max_diff(model_of(ddp), model_of(fsdp))
    print(f"FSDP vs DDP max abs weight difference after 24 steps: {diff:.3g}")
    assert diff < 1e-5
    # the sharded checkpoint of step 12 (mid-epoch 2): resume on 2 ranks ends bit-identical
    mid = fsdp / "checkpoints" / "step-00000012"
    assert sharded.is_complete(mid) and sharded.read_extra(mid)["batch_in_epoch"] == 4
    run_fit(2, *OPTS, *GLOBAL, "--epochs", "3", "--strategy", "fsdp", "--run-dir", str(resumed), "--resume", str(mid),
            "--clip-grad-norm", "100")
    a, b = model_of(fsdp), model_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the tools read sharded checkpoints: export loads strictly into the bare model, evaluate runs
    out = subprocess.run([sys.executable, "-m", "ddp_train", "export", str(fsdp), "-o", str(tmp_path / "m.pt")],
                         capture_output=True, text=True, env=base_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    bare = build_model("mlp", (16,), 4, (32, 16))
    bare.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    ev = subprocess.run([sys.executable, "-m", "ddp_train", "evaluate", "-c", str(fsdp / "checkpoints" / "last"),
                         "--json"], capture_output=True, text=True, env=base_env(), cwd=ROOT, timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["metrics"]["val_acc"] > 0.5


def test_export_of_a_ddp_checkpoint_loads_into_the_bare_model(tmp_path):
    run_fit(2, *OPTS, "--max-steps", "2", "--run-dir", str(tmp_path / "ddp"))
    out = subprocess.run([sys.executable, "-m", "ddp_train", "export", str(tmp_path / "ddp"), "-o",
                          str(tmp_path / "m.pt")], capture_output=True, text=True, env=base_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    bare = build_model("mlp", (16,), 4, (32, 16))
    bare.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_trajectory(tmp_path, strategy, before, after):
    """Stopped mid-epoch on `before` processes, resumed on `after`: the same step count and
    weights allclose to an uninterrupted run (the global batch fixes the samples of each step)."""
    # auto: DDP on 2 processes, the bare model on 1; fsdp on 1 process trains unsharded and its
    # checkpoints stay sharded
    opts = [*OPTS, *GLOBAL, "--epochs", "2", "--strategy", "fsdp" if strategy == "fsdp" else "auto"]
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    run_fit(before, *opts, "--run-dir", str(ref))
    run_fit(before, *opts, "--max-steps", "6", "--run-dir", str(moved))
    proc = run_fit(after, *opts, "--max-steps", "16", "--run-dir", str(moved))  # saved: 6
    assert f"world size {before} -> {after}: the same global batch of 32" in proc.stderr
    assert "epoch 1, step 6" in proc.stderr
    assert step_of(moved) == step_of(ref) == 16
    diff = max_diff(model_of(ref), model_of(moved))
    print(f"{strategy} {before} -> {after}: max abs difference to the uninterrupted run {diff:.3g}")
    assert diff < 1e-5


def test_another_world_size_without_a_global_batch_is_refused(tmp_path):
    run_fit(2, *OPTS, "--max-steps", "2", "--run-dir", str(tmp_path / "r"))
    proc = run_fit(1, *OPTS, "--max-steps", "4", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "world size 2 -> 1" in proc.stderr and "--global-batch-size" in proc.stderr
