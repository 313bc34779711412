"""The GPU code paths whose mechanism runs on CPU: DataParallel's replicas (threads) and gathered
losses, FSDP with channels_last, a first-step error on one rank only, the CUDA RNG state per
device (a fake device count), the device per rank, the data-on-device loader, the TF32/benchmark
settings. The CUDA runs themselves are in tests/test_gpu.py (pytest -m gpu)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from torch import nn

from conftest import run_fit
from ddp_train import checkpoint
from ddp_train.dataparallel import Autocast, ReplicaParallel, combine
from ddp_train.distenv import DistEnv
from ddp_train.errors import UsageError

TASKS = "tests.fixtures.tasks"
ENV_BEFORE = dict(os.environ)


# --- DataParallel: what each replica thread computes, and how the replicas' outputs combine -------

def _in_replica_thread(fn):
    """Run `fn` as torch's parallel_apply runs a replica: a new thread that enters autocast with
    `enabled` only (so it gets the thread's default dtype, not the main thread's)."""
    out = {}

    def worker():
        with torch.autocast("cpu", enabled=True):
            out["value"] = fn()
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    return out["value"]


def test_replicas_compute_in_the_runs_autocast_dtype():
    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    default = torch.get_autocast_dtype("cpu")
    wanted = torch.float16 if default == torch.bfloat16 else torch.bfloat16
    with torch.autocast("cpu", dtype=wanted):
        assert _in_replica_thread(lambda: lin(x).dtype) == default  # torch's thread: not the run's dtype
        assert _in_replica_thread(lambda: Autocast(lin, wanted)(x).dtype) == wanted


def test_scalar_losses_combine_to_the_full_batch_mean():
    torch.manual_seed(0)
    net, x, y = nn.Linear(6, 3), torch.randn(7, 6), torch.randint(0, 3, (7,))
    full = nn.functional.cross_entropy(net(x), y)
    full.backward()
    expected = net.weight.grad.clone()
    net.weight.grad = None
    # DataParallel's scatter gives unequal chunks (7 over 2 replicas: 4 and 3)
    parts = [(net(x[:4]), nn.functional.cross_entropy(net(x[:4]), y[:4])),
             (net(x[4:]), nn.functional.cross_entropy(net(x[4:]), y[4:]))]
    logits, loss = combine(parts, [4, 3], "cpu")
    assert loss.dim() == 0 and torch.allclose(loss, full)
    assert torch.equal(logits, net(x))
    loss.backward()  # the gathered vector of per-replica losses could not do this
    assert torch.allclose(net.weight.grad, expected, atol=1e-6)
    assert combine([{"n": torch.tensor(2.0)}, {"n": torch.tensor(4.0)}], [1, 1], "cpu")["n"] == 3.0


def test_replica_parallel_weights_scalars_by_each_replicas_samples():
    dp = ReplicaParallel(nn.Linear(6, 3), torch.bfloat16)
    assert isinstance(dp.module, Autocast) and dp.module.dtype == torch.bfloat16
    assert isinstance(ReplicaParallel(nn.Linear(6, 3)).module, nn.Linear)  # fp32: no autocast layer
    dp._samples = [4, 3]  # what scatter recorded (scatter itself needs CUDA)
    out = dp.gather([torch.tensor(1.0), torch.tensor(8.0)], "cpu")
    assert out.dim() == 0 and out.item() == pytest.approx((4 * 1 + 3 * 8) / 7)


# --- FSDP + channels_last, the cnn under --deterministic -------------------------------------------

def test_fsdp_shards_a_channels_last_model(tmp_path):
    import torch.distributed as dist

    from ddp_train import fsdp

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(memory_format=torch.channels_last)
        fsdp.shard(net, None, device="cpu")  # raised NotImplementedError (non-contiguous parameters)
        x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
        net(x).sum().backward()
        assert all(p.grad is not None for p in net.parameters())
    finally:
        dist.destroy_process_group()


def test_cnn_has_no_layer_without_a_deterministic_cuda_backward():
    from ddp_train.models import cnn

    net = cnn((1, 28, 28), 10)
    assert not any(isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)) for m in net.modules())
    x = torch.randn(3, 64, 4, 4)
    assert torch.equal(net.adaptive_pool(x), nn.AdaptiveMaxPool2d((1, 1))(x))


# --- one rank fails at the first step ------------------------------------------------------------

def test_all_failed_tells_a_rank_local_failure_from_an_agreed_one():
    import torch.distributed as dist

    from ddp_train.dist import Comm

    store = dist.HashStore()
    env = DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    comm = Comm(env, store=store)
    assert not comm.all_failed("first_step", wait_s=0.2)  # only this rank: its own error
    store.add("ddp_train/failed/again", 1)  # the other rank failed too
    assert comm.all_failed("again", wait_s=5)


def test_out_of_memory_on_one_rank_is_reported_by_that_rank(tmp_path):
    proc = run_fit(2, "--task", f"{TASKS}:OutOfMemoryOnRank1", "--run-dir", str(tmp_path / "r"), "--no-progress",
                   check=False, timeout=180)
    err = proc.stderr
    assert proc.returncode != 0, err
    line = next((ln for ln in err.splitlines() if ln.startswith("error: [rank 1]")), "")
    assert "out of memory during training step 1 (cpu; CUDA out of memory. Tried to allocate 20.00 GiB" in line, err
    assert "lower --batch-size" in line and "--strategy fsdp" in line, err
    assert "its own log says why" not in err or "out of memory" in err


# --- the CUDA RNG state is the rank's own device's, whatever the visible count -------------------

def test_cuda_rng_state_is_saved_and_restored_for_this_device_only(monkeypatch):
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]  # 8 GPUs visible at save
    restored = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 3)
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: list(states))
    monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": states[3])
    monkeypatch.setattr(cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    monkeypatch.setattr(cuda, "set_rng_state_all", lambda all_states: restored.extend(all_states))
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda"], states[3])
    monkeypatch.setattr(cuda, "current_device", lambda: 0)  # resumed where this rank has cuda:0 only
    checkpoint.set_rng_state(saved)
    assert len(restored) == 1 and torch.equal(restored[0][0], states[3])
    restored.clear()
    checkpoint.set_rng_state({**saved, "cuda": states})  # an older checkpoint's list: this device's entry
    assert len(restored) == 1 and torch.equal(restored[0][0], states[0])


# --- the device of each rank -----------------------------------------------------------------------

def _torchrun_env(local_world: int) -> dict[str, str]:
    return {"RANK": "1", "WORLD_SIZE": str(local_world), "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}


def test_torchrun_ranks_sharing_one_gpu_under_nccl_are_refused():
    with pytest.raises(UsageError, match="local rank 1 has no GPU of its own.*--nproc_per_node=1.*--backend gloo"):
        DistEnv.from_environ(_torchrun_env(2), cuda_devices=1)
    assert DistEnv.from_environ(_torchrun_env(2), cuda_devices=1, backend="gloo").device == "cuda:0"
    assert DistEnv.from_environ(_torchrun_env(2), cuda_devices=2).device == "cuda:1"
    slurm = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "7",
             "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "n1"}
    assert DistEnv.from_environ(slurm, cuda_devices=1).device == "cuda:0"  # srun --gpus-per-task=1


# --- --data-on-device feeds training; the run's numeric settings -----------------------------------

def test_data_on_device_feeds_training_from_the_moved_copy(monkeypatch, tmp_path):
    from ddp_train import data, fit, train

    moved, fed = [], []
    real_to, real_loader = data.TensorData.to, train.train_loader

    def to(self, device):
        moved.append(real_to(self, device))
        return moved[-1]

    def loader(ds, *args, **kwargs):
        fed.append(ds)
        return real_loader(ds, *args, **kwargs)

    monkeypatch.setattr(data.TensorData, "to", to)
    monkeypatch.setattr(train, "train_loader", loader)
    fit(data="synthetic", input_shape="8", classes=3, samples=64, val_samples=16, model="mlp", hidden="8",
        batch_size=16, epochs=1, data_on_device=True, run_dir=str(tmp_path / "r"), progress=False)
    assert fed and any(fed[0] is m for m in moved)  # the training loader reads the device copy


def test_tf32_and_cudnn_autotuning_unless_deterministic_and_restored_after():
    from ddp_train.numerics import numerics

    cudnn = torch.backends.cudnn
    before = (torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    with numerics(deterministic=False, tf32=True, device_type="cuda"):
        assert torch.get_float32_matmul_precision() == "high" and cudnn.allow_tf32 and cudnn.benchmark
    with numerics(deterministic=False, tf32=False, device_type="cuda"):
        assert torch.get_float32_matmul_precision() == "highest" and not cudnn.allow_tf32 and not cudnn.benchmark
    with numerics(deterministic=True, tf32=True, device_type="cuda"):
        assert torch.are_deterministic_algorithms_enabled() and not cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "highest"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" or "CUBLAS_WORKSPACE_CONFIG" in ENV_BEFORE
    after = (torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    assert after == before and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ENV_BEFORE.get("CUBLAS_WORKSPACE_CONFIG")
    with numerics(deterministic=False, tf32=True, device_type="cpu"):  # CPU matmuls stay as they are
        assert torch.get_float32_matmul_precision() == before[0]


def test_image_folders_get_loader_workers_on_gpu_by_default():
    from ddp_train.config import FitConfig
    from ddp_train.data import default_workers

    assert FitConfig().workers is None  # unset: chosen per data set and device
    assert default_workers("imagefolder", cuda=True, local_world_size=1) >= 1
    assert default_workers("imagefolder", cuda=False, local_world_size=1) == 0
    assert default_workers("cifar10", cuda=True, local_world_size=1) == 0  # in memory


def test_channels_last_inputs_take_one_copy():
    from ddp_train.batch import move_to

    x = torch.randn(2, 3, 4, 4)
    out = move_to([x, torch.zeros(2)], torch.device("cpu"), channels_last=True)
    assert out[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(out[0], x)


# --- CUDA memory in the log and metrics.jsonl; the out-of-memory line ------------------------------

def test_train_lines_and_events_carry_the_cuda_memory_peaks(tmp_path, caplog):
    import json
    import logging

    from ddp_train.log import Progress, Reporter, RunFiles, Tracker

    files = RunFiles(tmp_path)
    report = Reporter(files, Tracker(), Progress(False))
    memory = {"max_mem_allocated_gib": 1.5, "max_mem_reserved_gib": 2.0}
    with caplog.at_level(logging.INFO, logger="ddp_train"):
        report.train(10, 1, 100, 1, 640, 0.5, 1e-3, 123.0, memory)
        report.train(20, 1, 100, 1, 1280, 0.4, 1e-3, 123.0)  # off CUDA: no figures
    files.close()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["max_mem_allocated_gib"] == 1.5 and events[0]["max_mem_reserved_gib"] == 2.0
    assert "max_mem_allocated_gib" not in events[1]
    assert "mem 1.5/2.0 GiB" in caplog.text


def test_out_of_memory_names_the_step_and_what_to_lower():
    from ddp_train.errors import RankError
    from ddp_train.gpumem import named_oom

    with pytest.raises(RankError, match=r"during the evaluation at step 7 \(cpu; CUDA out of memory\. Tried.*\); "
                                        r"lower --eval-batch-size, or shard the model with --strategy fsdp"):
        with named_oom(torch.device("cpu"), "the evaluation at step 7", evaluation=True):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
