"""Resume refuses what would mix two runs in one directory: another strategy's checkpoints, other
data behind the same --data-dir, an --init-from that would be ignored."""

import pytest
import torch

from conftest import run_fit
from ddp_train.errors import UsageError
from ddp_train.fingerprint import data_fingerprint, describe_change
from ddp_train.train import _check_init_from

pytestmark = pytest.mark.slow


def _error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_strategy_switch_and_ignored_init_from_are_refused(tmp_path, tiny):
    run_fit(1, *tiny("run", "--max-steps", "4"))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    history = (tmp_path / "run" / "history.csv").read_text()

    line = _error(run_fit(1, *tiny("run", "--max-steps", "8", "--strategy", "fsdp"), check=False))
    assert line == (f"error: {tmp_path / 'run'} holds plain checkpoints ({last}) that --strategy fsdp cannot "
                    "resume: pass the --strategy it ran with (auto, ddp, dp or single) to continue that run, or "
                    "another --run-dir (`ddp-train export` makes a state dict of its weights for --init-from)")

    line = _error(run_fit(1, *tiny("run", "--max-steps", "8", "--init-from", str(last)), check=False))
    assert line.startswith(f"error: --init-from {last} would be ignored: {last} (step 4) continues this run")
    assert (tmp_path / "run" / "history.csv").read_text() == history  # nothing touched


def test_other_data_behind_the_same_data_dir_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    torch.save({"x": x, "y": (x.sum(1) > 0).long()}, data / "data.pt")
    args = ["--data", "tests.fixtures.userdefs:from_files", "--data-dir", str(data), "--batch-size", "16",
            "--run-dir", str(tmp_path / "run"), "--no-progress"]
    run_fit(1, *args, "--max-steps", "4")
    x[-1] += 1  # one validation sample changed, the sizes the same
    torch.save({"x": x, "y": (x.sum(1) > 0).long()}, data / "data.pt")
    line = _error(run_fit(1, *args, "--max-steps", "8", check=False))
    assert line == (f"error: cannot resume {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: the data changed "
                    "(validation samples with other contents) since it was saved: another data set is behind "
                    f"--data-dir {data}; restore that data to continue the run, or pass another --run-dir for a "
                    "new run on this data")


def test_fingerprint_names_sizes_and_contents():
    x = torch.arange(40.0).reshape(20, 2)
    splits = {"train": list(range(30)), "val": [(x[i], i % 2) for i in range(20)]}
    base = data_fingerprint(splits)
    assert data_fingerprint(splits) == base
    assert describe_change(base, data_fingerprint({**splits, "train": list(range(31))})) == \
        "the data changed (train samples 30 -> 31)"
    other = [(x[i] + (i == 10), i % 2) for i in range(20)]  # the middle sample, one of the three hashed
    assert describe_change(base, data_fingerprint({**splits, "val": other})) == \
        "the data changed (validation samples with other contents)"
    assert describe_change({}, base) is None  # a checkpoint from before fingerprints


def test_the_same_init_from_again_is_a_requeue_not_a_change():
    ckpt = {"config": {"init_from": "base.pt"}, "step": 7}
    from ddp_train.config import FitConfig

    _check_init_from(ckpt, FitConfig(init_from="base.pt"), "last.pt")
    _check_init_from(ckpt, FitConfig(), "last.pt")
    with pytest.raises(UsageError, match="--init-from other.pt would be ignored: last.pt \\(step 7\\)"):
        _check_init_from(ckpt, FitConfig(init_from="other.pt"), "last.pt")
