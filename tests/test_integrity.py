"""Corruption is caught: a flipped byte anywhere in a checkpoint (plain, or any file of a sharded
one) is detected before the checkpoint is used, and a corrupt newest checkpoint is skipped for
the next valid one with a warning naming both."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from ddp_train import checkpoint
from ddp_train.checkpoint import plain, sharded
from ddp_train.errors import UsageError
from ddp_train.integrity import ALGORITHM

TRIALS = 100


def _state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return {"version": checkpoint.FORMAT_VERSION, "step": step, "epoch": 0, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "config": {"lr": 0.1}, "checksum": ALGORITHM}


def _flip(data: bytes, at: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    out[at] ^= rng.randrange(1, 256)
    return bytes(out)


class _Warnings(logging.Handler):
    """ddp_train's logger may not propagate (setup_logging): listen to it directly."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"

    def __enter__(self):
        logging.getLogger("ddp_train").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("ddp_train").removeHandler(self)


def _positions(size: int, rng: random.Random) -> list[int]:
    """TRIALS distinct offsets over the whole file, its first and last bytes included."""
    return sorted({0, size - 1} | set(rng.sample(range(1, size - 1), TRIALS - 2)))


def test_a_flipped_byte_anywhere_in_a_plain_checkpoint_is_detected(tmp_path):
    plain.write(_state(4), tmp_path, best=False, step_file=False, keep=1)
    path = tmp_path / "last.pt"
    good = path.read_bytes()
    assert torch.load(path, weights_only=True)["step"] == 4  # still a plain torch.save file
    rng = random.Random(0)
    detected = 0
    for at in _positions(len(good), rng):
        path.write_bytes(_flip(good, at, rng))
        with pytest.raises(UsageError, match="corrupt") as error:
            checkpoint.load_checkpoint(path)
        assert str(error.value).startswith(f"checkpoint {path} is ")
        detected += 1
    assert detected == TRIALS
    path.write_bytes(good)
    assert checkpoint.load_checkpoint(path)["step"] == 4


def test_a_flipped_byte_anywhere_in_a_sharded_checkpoint_is_detected(tmp_path):
    state = _state(4)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model.load_state_dict(state["model"])
    ckpt = sharded.save(tmp_path, "last", model, None, {"step": 4}, is_main=True, barrier=lambda: None)
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    goods = {p: p.read_bytes() for p in files}
    total = sum(len(b) for b in goods.values())
    rng = random.Random(1)
    detected = 0
    for offset in _positions(total, rng):
        for p, data in goods.items():  # the file that holds this offset of all the files, end to end
            if offset < len(data):
                break
            offset -= len(data)
        p.write_bytes(_flip(data, offset, rng))
        with pytest.raises(UsageError, match="corrupt|not a complete sharded checkpoint"):
            sharded.verify(ckpt, "use another")
        p.write_bytes(data)
        detected += 1
    assert detected == TRIALS and {p.name for p in files} == {".metadata", "COMPLETE", "__0_0.distcp", "extra.pt"}
    sharded.verify(ckpt, "use another")


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_next_valid_one(tmp_path):
    plain.write(_state(8), tmp_path, best=False, step_file=True, keep=3)
    plain.write(_state(12), tmp_path, best=False, step_file=False, keep=3)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(_flip(data, len(data) // 2, random.Random(2)))
    with _Warnings() as caplog:
        found = checkpoint.latest(tmp_path)
    step8 = tmp_path / "step-00000008.pt"
    assert found == step8
    assert f"checkpoint {last} is corrupt" in caplog.text and f"resuming from {step8} (step 8) instead" in caplog.text


def test_a_corrupt_newest_sharded_checkpoint_is_skipped_for_the_next_valid_one(tmp_path):
    model = torch.nn.Linear(4, 2)
    sharded.write(tmp_path, model, None, {"step": 3}, is_main=True, barrier=lambda: None, step_dir=True)
    sharded.write(tmp_path, model, None, {"step": 5}, is_main=True, barrier=lambda: None)
    shard = tmp_path / "last" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.unlink()  # a file of its own: the step copy's hard link keeps the good bytes
    shard.write_bytes(_flip(data, 10, random.Random(3)))
    with _Warnings() as caplog:
        found = checkpoint.latest(tmp_path, sharded=True)
    step3 = tmp_path / "step-00000003"
    assert found == step3
    assert f"sharded checkpoint {tmp_path / 'last'} is corrupt" in caplog.text
    assert f"resuming from {step3} (step 3) instead" in caplog.text


def test_checkpoints_without_checksums_still_load(tmp_path):
    """Written before checksums existed: no trailer, no `checksum` entry, sizes-only manifest."""
    state = {k: v for k, v in _state(2).items() if k != "checksum"}
    torch.save(state, tmp_path / "old.pt")
    assert checkpoint.load_checkpoint(tmp_path / "old.pt")["step"] == 2
    model = torch.nn.Linear(4, 2)
    ckpt = sharded.save(tmp_path, "last", model, None, {"step": 2}, is_main=True, barrier=lambda: None)
    (ckpt / "COMPLETE").write_text(__import__("json").dumps(
        {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != "COMPLETE"}))
    sharded.verify(ckpt, "use another")
    assert sharded.read_extra(ckpt)["step"] == 2


def test_a_missing_trailer_on_a_checksummed_checkpoint_is_corrupt(tmp_path: Path):
    """The trailer cut off (a byte of its magic flipped) is not taken for an old checkpoint."""
    plain.write(_state(3), tmp_path, best=False, step_file=False, keep=1)
    path = tmp_path / "last.pt"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="checksum trailer is missing"):
        checkpoint.load_checkpoint(path)
