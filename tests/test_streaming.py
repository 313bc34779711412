"""Streaming training data (an IterableDataset): sharded over ranks and loader workers without
duplicates, resumed exactly mid-epoch, and one line where its length would be needed."""

from __future__ import annotations

import pytest
import torch

from conftest import base_env, run_fit
from ddp_train import UsageError, fit
from tests.fixtures.tasks import Blobs, StreamTask


def _seen(seen_dir) -> list[list[list[int]]]:
    """Per rank, the ids of each training batch in order."""
    return [[list(map(int, line.split())) for line in (seen_dir / f"rank{r}").read_text().splitlines()]
            for r in (0, 1)]


@pytest.mark.slow
def test_every_sample_once_per_epoch_on_2_ranks_x_2_workers_across_a_resume(tmp_path):
    """64 samples, batches of 4, 2 ranks: 8 steps an epoch. Stop mid-epoch 2 (step 12), resume to 16."""
    seen_dir, run_dir = tmp_path / "seen", tmp_path / "run"
    seen_dir.mkdir()
    opts = ["--task", "tests.fixtures.tasks:StreamTask", "--workers", "2", "--batch-size", "4", "--run-dir",
            str(run_dir), "--no-progress", "--log-every", "4"]
    env = base_env(SEEN_DIR=str(seen_dir))
    run_fit(2, *opts, "--max-steps", "12", env=env)
    proc = run_fit(2, *opts, "--max-steps", "16", env=env)
    assert "resumed from" in proc.stderr
    per_rank = _seen(seen_dir)
    assert [len(batches) for batches in per_rank] == [16, 16]
    for epoch in (0, 1):
        ids = sorted(i for batches in per_rank for batch in batches[8 * epoch:8 * epoch + 8] for i in batch)
        assert ids == list(range(64)), f"epoch {epoch + 1}: each sample once"


@pytest.mark.parametrize("skippable", [False, True])
def test_mid_epoch_resume_is_exact(tmp_path, capfd, skippable):
    """One process, 2 workers: 16 batches an epoch; stopped at step 6, resumed to 20 (epoch 2)."""
    opts = dict(batch_size=4, workers=2, progress=False, save_every_seconds=0)
    fit(StreamTask(skippable), max_steps=20, run_dir=str(tmp_path / "straight"), **opts)
    fit(StreamTask(skippable), max_steps=6, run_dir=str(tmp_path / "resumed"), **opts)
    capfd.readouterr()
    result = fit(StreamTask(skippable), max_steps=20, run_dir=str(tmp_path / "resumed"), **opts)
    assert result.step == 20 and result.epoch == 1
    err = capfd.readouterr().err  # it resumed: a run started over would end with the same weights too
    assert f"resumed from {tmp_path / 'resumed'}/checkpoints/last.pt: epoch 1, step 6 (6 of the epoch's" in err, err

    def weights(name):
        return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]

    a, b = weights("straight"), weights("resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stream_needs_max_steps_and_a_map_style_validation_set(tmp_path):
    with pytest.raises(UsageError, match=r"^the training set is a stream .* pass --max-steps") as e:
        fit(StreamTask(), epochs=2, run_dir=str(tmp_path / "a"), progress=False)
    assert "\n" not in str(e.value)

    class StreamedVal(StreamTask):
        def data(self, cfg):
            return {"train": Blobs(8, 0), "val": super().data(cfg)["train"]}

    with pytest.raises(UsageError, match=r"^the validation set is a stream"):
        fit(StreamedVal(), max_steps=2, run_dir=str(tmp_path / "b"), progress=False)
