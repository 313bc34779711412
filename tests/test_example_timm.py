"""examples/timm_classifier.py: timm's resnet18 (narrowed), RandAugment, random erasing, label
smoothing and its AdamW parameter groups, under FSDP in bf16 on 2 ranks (BatchNorm kept in float32)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, run_fit

EXAMPLE = ROOT / "examples" / "timm_classifier.py"


@pytest.mark.slow
def test_timm_classifier_trains_under_fsdp_bf16_on_2_ranks(tmp_path):
    run_dir = tmp_path / "timm"
    run_fit(2, "--task", f"{EXAMPLE}:TimmClassifier", "--task-arg", "width=8", "--task-arg", "samples=64",
            "--task-arg", "size=16", "--strategy", "fsdp", "--precision", "bf16", "--epochs", "2", "--batch-size", "8",
            "--lr", "3e-3", "--run-dir", str(run_dir), "--no-progress")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 2 and all(math.isfinite(e["val_loss"]) and math.isfinite(e["train_loss"]) for e in evals)
    assert [e["lr"] for e in evals] == pytest.approx([3e-3, 1.5e-3])  # cosine over 2 epochs, stepped per epoch
    described = json.loads((run_dir / "config.json").read_text())["optimization"]
    groups = described["optimizer"]["param_groups"]
    assert described["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]  # timm's split: no decay on biases and norms
    assert described["scheduler"]["interval"] == "epoch"
