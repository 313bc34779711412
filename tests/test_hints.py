"""Every hint points the right way: an empty training set, labels out of range in a Task, fit()
given the class, more processes than cores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp_train import Task, TensorData, UsageError, fit
from ddp_train.distenv import DistEnv


class Labels(Task):
    """Four labels (0..3), `outputs` outputs; `train` samples."""

    def __init__(self, outputs: int = 4, train: int = 32):
        self.outputs, self.train = outputs, train

    def data(self, cfg):
        x = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
        y = torch.arange(32) % 4
        return {"train": TensorData(x[:self.train], y[:self.train]), "val": TensorData(x[:8], y[:8])}

    def model(self, cfg):
        return nn.Linear(5, self.outputs)


def test_an_empty_training_set_says_so(tmp_path):
    with pytest.raises(UsageError, match=r"^the training set is empty: the data's 'train' split has 0 samples; "
                                         r"check where the data comes from"):
        fit(Labels(train=0), run_dir=str(tmp_path / "r"), progress=False)


def test_labels_out_of_range_in_a_task_name_the_range(tmp_path):
    with pytest.raises(UsageError) as e:
        fit(Labels(outputs=3), batch_size=16, run_dir=str(tmp_path / "r"), progress=False)
    assert str(e.value).startswith("--task ") and "while training on the first batch" in str(e.value)
    assert str(e.value).endswith("labels must be 0..2 for the model's 3 outputs (this batch has 0..3); fix the "
                                 "labels, or give the model one output per class"), e.value


def test_fit_given_the_class_says_to_make_one():
    with pytest.raises(TypeError, match=r"^fit\(\) takes an instance of your Task, not the class: fit\(Labels\(\)\), "
                                        r"not fit\(Labels\)$"):
        fit(Labels)


@pytest.mark.parametrize("local, cores, warned", [(8, 2, True), (2, 2, False), (1, 1, False)])
def test_more_processes_than_cores_is_one_warning(local, cores, warned):
    env = DistEnv.from_environ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(local),
                                "LOCAL_WORLD_SIZE": str(local), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    message = env.oversubscribed(cores)
    if warned:
        assert message == (f"{local} processes on {cores} CPU cores: they take turns on the cores, so this runs slower "
                           f"than {cores} would; start at most {cores} per machine (--nproc_per_node={cores})")
    else:
        assert message is None


class LateBadLabel(Labels):
    """Its third batch's labels leave the model's range."""

    def eval_step(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        x, y = batch
        return model(x), y + 1 if self.calls == 3 else y


def test_labels_out_of_range_in_a_later_batch_are_one_line_naming_the_step(tmp_path, capfd):
    from ddp_train import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["fit", "--task", "test_hints:LateBadLabel", "--batch-size", "8", "--run-dir", str(tmp_path / "r"),
                  "--no-progress"])
    err = capfd.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: [rank 0] --task test_hints:LateBadLabel raised LabelError while training step 3: labels must be 0..3 "
        "for the model's 4 outputs (this batch has 1..4); fix the labels, or give the model one output per class"]
