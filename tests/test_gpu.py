"""The CUDA tier: `pytest -m gpu` on a machine with one or more NVIDIA GPUs (skipped without CUDA).

One GPU: single-device runs in 32/bf16/fp16 (with the GradScaler), --compile, --channels-last,
--data-on-device, --deterministic resume bit-exact, TF32 and cuDNN autotuning during a run, CUDA
memory figures in metrics.jsonl, the one-line out-of-memory error, and DDP and FSDP2 in a one-rank
NCCL group. Two or more GPUs: DDP and FSDP over NCCL with torchrun, and DataParallel (one process)
with built-in and loss-returning Tasks in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import base_env, run_fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2+ CUDA GPUs")
CNN = ["--data", "synthetic", "--input-shape", "3,16,16", "--classes", "4", "--samples", "512", "--val-samples",
       "128", "--model", "cnn", "--batch-size", "32", "--epochs", "2", "--no-progress", "--log-every", "4"]


def _events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")


def _env(gpus: int = 1) -> dict[str, str]:
    return base_env(CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))


@pytest.mark.parametrize("extra", [[], ["--precision", "bf16"], ["--precision", "fp16", "--clip-grad-norm", "1"],
                                   ["--precision", "bf16", "--channels-last"], ["--data-on-device"],
                                   ["--precision", "bf16", "--compile"]],
                         ids=["fp32", "bf16", "fp16-scaler-clip", "bf16-channels-last", "data-on-device", "compile"])
def test_single_gpu_trains_and_reports_memory(tmp_path, extra):
    run_dir = tmp_path / "r"
    run_fit(1, *CNN, "--run-dir", str(run_dir), *extra, env=_env(), timeout=600)
    train = _events(run_dir, "train")
    assert train and all(e["max_mem_allocated_gib"] > 0 and e["max_mem_reserved_gib"] >= e["max_mem_allocated_gib"]
                         for e in train)
    ckpt = _ckpt(run_dir)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    if "fp16" in extra:
        assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0


def test_deterministic_resume_is_bit_exact(tmp_path):
    opts = [*CNN, "--deterministic", "--save-every", "4", "--keep", "10"]
    run_fit(1, *opts, "--run-dir", str(tmp_path / "full"), env=_env(), timeout=600)
    mid = tmp_path / "full" / "checkpoints" / "step-00000012.pt"
    run_fit(1, *opts, "--run-dir", str(tmp_path / "resumed"), "--resume", str(mid), env=_env(), timeout=600)
    full, resumed = _ckpt(tmp_path / "full"), _ckpt(tmp_path / "resumed")
    assert full["step"] == resumed["step"]
    for key in full["model"]:
        assert torch.equal(full["model"][key], resumed["model"][key]), key


def test_out_of_memory_is_one_line_with_the_figures(tmp_path):
    proc = run_fit(1, "--task", "tests.fixtures.tasks:HugeAllocation", "--run-dir", str(tmp_path / "r"),
                   "--no-progress", env=_env(), check=False, timeout=300)
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 1 and "out of memory during training step 1 (cuda:0: peak" in last, proc.stderr


def test_tf32_and_autotuning_during_a_run_only(tmp_path):
    from ddp_train import Task, fit

    seen = {}

    class Probe(Task):
        def data(self, cfg):
            from ddp_train.data import TensorData

            x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
            return {"train": TensorData(x, y), "val": TensorData(x[:16], y[:16])}

        def model(self, cfg):
            return nn.Linear(8, 2)

        def loss(self, model, batch):
            seen["precision"] = torch.get_float32_matmul_precision()
            seen["benchmark"] = torch.backends.cudnn.benchmark
            return nn.functional.cross_entropy(model(batch[0]), batch[1])

    before = torch.get_float32_matmul_precision()
    fit(Probe(), epochs=1, batch_size=16, run_dir=str(tmp_path / "a"), progress=False)
    assert seen == {"precision": "high", "benchmark": True}
    fit(Probe(), epochs=1, batch_size=16, run_dir=str(tmp_path / "b"), progress=False, tf32=False)
    assert seen == {"precision": "highest", "benchmark": False}
    assert torch.get_float32_matmul_precision() == before


def test_ddp_and_fsdp_in_a_one_rank_nccl_group():
    import torch.distributed as dist

    from ddp_train import fsdp
    from ddp_train.distenv import DistEnv
    from ddp_train.parallel import wrap

    torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        env = DistEnv.from_environ({}, cuda_devices=1)
        x, y = torch.randn(32, 16, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
        torch.manual_seed(0)
        ddp = wrap(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda(), "ddp", env, False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nn.functional.cross_entropy(ddp(x), y).backward()
        torch.manual_seed(0)
        sharded = fsdp.shard(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda(), precision="bf16",
                             device="cuda")
        nn.functional.cross_entropy(sharded(x), y).backward()
        ours = fsdp.clip_grad_norm(sharded.parameters(), 1e9)
        full = torch.stack([p.grad.full_tensor().float().norm() for p in sharded.parameters()]).norm()
        assert ours.device.type == "cuda" and torch.allclose(ours, full, rtol=1e-4)
    finally:
        dist.destroy_process_group()


@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_over_nccl(tmp_path, strategy):
    run_dir = tmp_path / strategy
    run_fit(2, *CNN, "--strategy", strategy, "--precision", "bf16", "--run-dir", str(run_dir), env=_env(2),
            timeout=600)
    assert _events(run_dir, "eval")


@two_gpus
def test_data_parallel_trains_builtin_and_loss_returning_tasks_in_bf16(tmp_path):
    proc = run_fit(1, *CNN, "--precision", "bf16", "--run-dir", str(tmp_path / "b"), env=_env(2), timeout=600)
    assert "strategy=dp" in proc.stderr
    run_fit(1, "--task", "tests.fixtures.tasks:LossInModel", "--precision", "bf16", "--epochs", "2", "--no-progress",
            "--run-dir", str(tmp_path / "t"), env=_env(2), timeout=600)
    assert _events(tmp_path / "t", "eval")[-1]["val_loss"] < 1.2
