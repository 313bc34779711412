"""FSDP2 and sharded (DCP) checkpoints: in-process checks of the checkpoint files, then real torchrun
processes over gloo (tests/fixtures/fsdp_worker.py): FSDP vs DDP, exact resume, resharding on 1 and
3 ranks, export, and a save killed before it completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import BIN, ROOT, base_env
from ddp_train import checkpoint, fsdp
from ddp_train.checkpoint import sharded
from ddp_train.errors import UsageError

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import fsdp_worker  # noqa: E402

WORKER = ROOT / "tests" / "fixtures" / "fsdp_worker.py"


def torchrun(nproc: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *map(str, args)]


def run_worker(nproc: int, *args, timeout: float = 240) -> None:
    proc = subprocess.run(torchrun(nproc, *args), capture_output=True, text=True, timeout=timeout,
                          env=base_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- one process, no process group: the checkpoint files ----------------------------------------

def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = fsdp_worker.Net(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return model, opt


def _save(ckpt_dir: Path, name: str, model, opt, step: int) -> Path:
    return sharded.save(ckpt_dir, name, model, opt, {"step": step, "rng": [torch.arange(step)], "tag": "x"},
                        is_main=True, barrier=lambda: None)


def test_save_load_export_in_one_process(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, "last", model, opt, 3)
    assert sharded.is_complete(path) and not (tmp_path / ".last.tmp").exists()
    exported = sharded.export(path)
    assert equal(exported, model.state_dict())
    fsdp_worker.Net(8).load_state_dict(exported, strict=True)

    other, other_opt = _trained(seed=1)
    extra = sharded.load(path, other, other_opt)
    assert extra["step"] == 3 and torch.equal(extra["rng"][0], torch.arange(3)) and extra["tag"] == "x"
    assert equal(other.state_dict(), model.state_dict())
    a, b = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(equal(a[i], b[i]) for i in a)


def test_replace_copies_and_purge(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        sharded.write(tmp_path, model, opt, {"step": step}, is_main=True, barrier=lambda: None,
                      step_dir=True, keep=2, best=step == 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "last", "step-00000002", "step-00000003"], names
    assert sharded.read_extra(tmp_path / "last")["step"] == 3
    assert sharded.read_extra(tmp_path / "best")["step"] == 2
    assert (tmp_path / "last" / "extra.pt").stat().st_ino == (tmp_path / "step-00000003" / "extra.pt").stat().st_ino
    assert sharded.candidates(tmp_path) == [tmp_path / "last", tmp_path / "step-00000003", tmp_path / "step-00000002"]
    assert checkpoint.latest(tmp_path, sharded=True) == tmp_path / "last"


def test_replace_without_atomic_swap_and_crash_recovery(tmp_path, monkeypatch):
    def no_swap(a, b):
        raise OSError(22, "not supported here")

    monkeypatch.setattr(sharded, "_exchange", no_swap)
    model, opt = _trained()
    _save(tmp_path, "last", model, opt, 1)
    _save(tmp_path, "last", model, opt, 2)
    assert sharded.read_extra(tmp_path / "last")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    # A crash between "rename old away" and "rename new in": the old one is still found...
    os.rename(tmp_path / "last", tmp_path / ".last.old")
    assert checkpoint.latest(tmp_path, sharded=True) == tmp_path / ".last.old"
    # ...and the next save, of any name, restores it first.
    _save(tmp_path, "step-00000003", model, opt, 3)
    assert sharded.is_complete(tmp_path / "last") and not (tmp_path / ".last.old").exists()
    assert sharded.read_extra(tmp_path / "last")["step"] == 2


def test_is_complete_rejects_partial_directories(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, "last", model, opt, 1)
    shard = next(path.glob("*.distcp"))
    with open(shard, "ab") as f:
        f.write(b"x")
    assert not sharded.is_complete(path)
    shard.unlink()
    assert not sharded.is_complete(path)
    with pytest.raises(UsageError, match="not a complete sharded checkpoint"):
        sharded.load(path, model, opt)
    assert not sharded.is_complete(tmp_path / "missing")


def test_extra_must_be_plain(tmp_path):
    model, opt = _trained()
    with pytest.raises(UsageError, match=r"extra\['when'\] is a \w*Path"):
        sharded.save(tmp_path, "last", model, opt, {"when": tmp_path}, is_main=True, barrier=lambda: None)


def test_default_blocks():
    from torchvision.models import resnet18
    net = resnet18()
    blocks = fsdp.default_blocks(net)  # the repeated blocks, not the stages (one stage held 40-60%)
    assert blocks == [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    net = fsdp_worker.Net()
    assert fsdp.default_blocks(net) == list(net.blocks)  # a ModuleList gives its items
    flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert fsdp.default_blocks(flat) == [flat[1], flat[3]]


# --- torchrun, gloo -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One 2-rank run: DDP and FSDP for 20 steps, with and without accumulation, and FSDP for 10
    steps with sharded checkpoints at steps 5 (also `best`) and 10."""
    out = tmp_path_factory.mktemp("fsdp")
    run_worker(2, "reference", out)
    return out, torch.load(out / "reference.pt", weights_only=True), json.loads((out / "reference.json").read_text())


@pytest.mark.slow
def test_fsdp_matches_ddp(reference):
    _, ref, results = reference
    diff = max_diff(ref["ddp"], ref["fsdp20"])
    accum = max_diff(ref["ddp_accum"], ref["fsdp_accum"])
    print(f"max abs weight difference FSDP vs DDP after 20 Adam steps: {diff:.3g} "
          f"(with 2 micro-batches: {accum:.3g})")
    assert diff <= 1e-5 and accum <= 1e-5
    # Clipping was active (max norm 0.5) and our norm is DDP's, the same on every rank.
    assert results["fsdp_norms"] == pytest.approx(results["ddp_norms"], rel=1e-5)
    assert min(results["fsdp_norms"]) > fsdp_worker.MAX_NORM
    assert results["our_norm"] == pytest.approx(results["torch_dtensor_norm"], rel=1e-6)
    assert results["norms_same_on_all_ranks"] and results["all_ranks_equal_rank0"]
    assert equal(ref["everywhere"], ref["fsdp20"])
    assert results["blocks"] == ["FSDPNet", "FSDPBlock", "FSDPBlock", "FSDPBlock"]
    assert results["bf16_finite"] and results["bf16_param_dtypes"] == ["torch.float32"]
    assert results["bf16_output_dtype"] == "torch.float32"
    # bf16 compute: near the float32 run, not equal to it.
    assert results["bf16_norms"][0] != results["fsdp_norms"][0]
    assert results["bf16_norms"][0] == pytest.approx(results["fsdp_norms"][0], rel=0.05)


@pytest.mark.slow
def test_checkpoint_layout_and_export(reference):
    out, ref, _ = reference
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last", "step-00000010"]  # keep=1
    assert sorted(p.name for p in (ckpt / "last").iterdir()) == [
        ".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "extra.pt"]
    assert sharded.read_extra(ckpt / "best")["step"] == 5 and checkpoint.latest(ckpt, sharded=True) == ckpt / "last"
    exported = sharded.export(ckpt / "last")
    fsdp_worker.Net().load_state_dict(exported, strict=True)
    assert equal(exported, ref["full10"])


@pytest.mark.slow
def test_resume_on_two_ranks_is_exact(reference):
    out, ref, _ = reference
    run_worker(2, "resume", out, out / "ckpt" / "step-00000010")
    resumed = torch.load(out / "resumed-2.pt", weights_only=True)
    assert resumed["extra_step"] == 10
    assert equal(resumed["fsdp"], ref["fsdp20"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_reshards(reference, nproc):
    """Written by 2 ranks, resumed by 1 (sharded and bare) or 3: the same run up to round-off."""
    out, ref, _ = reference
    run_worker(nproc, "resume", out, out / "ckpt" / "last")
    resumed = torch.load(out / f"resumed-{nproc}.pt", weights_only=True)
    diffs = {k: max_diff(v, ref["fsdp20"]) for k, v in resumed.items() if k != "extra_step"}
    print(f"{nproc} rank(s) resuming a 2-rank checkpoint, max abs difference: {diffs}")
    assert all(d <= 1e-5 for d in diffs.values())


@pytest.mark.slow
def test_killed_save_keeps_previous_checkpoint(tmp_path):
    """Rank 0 is SIGKILLed after every rank wrote its shards (and DCP its .metadata) but before
    COMPLETE: `last` is still the step-5 checkpoint, and the half-written one is not complete."""
    proc = subprocess.Popen(torchrun(2, "kill", tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=base_env(), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        pid = None
        while pid is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker never paused (exit {proc.returncode}):\n{proc.communicate()[0]}")
            try:
                pid = int((tmp_path / "paused").read_text())
            except (OSError, ValueError):
                time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode != 0, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ckpt = tmp_path / "ckpt"
    assert not (tmp_path / "not-killed").exists()
    half = ckpt / ".last.tmp"
    assert (half / ".metadata").is_file() and (half / "extra.pt").is_file() and not sharded.is_complete(half)
    assert sharded.is_complete(ckpt / "last") and sharded.read_extra(ckpt / "last")["step"] == 5
    assert checkpoint.latest(ckpt, sharded=True) == ckpt / "last"
    fsdp_worker.Net().load_state_dict(sharded.export(ckpt / "last"), strict=True)
