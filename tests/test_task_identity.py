"""A Task's identity is its class and settings, not where its file lives: a run resumes after the
checkout moves, from a per-job copy, and whether the Task is named by file or by module; a
genuinely different Task is still refused."""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

from ddp_train import FitConfig, UsageError, fit
from ddp_train.config import task_identity
from ddp_train.train import default_run_dir

TASK_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    from ddp_train import Task, TensorData


    class SeqTask(Task):
        def __init__(self, width: int = 8):
            self.width = width

        def data(self, cfg):
            x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
            y = (x.sum(1) > 0).long()
            return {"train": TensorData(x, y), "val": TensorData(x[:16], y[:16])}

        def model(self, cfg):
            return nn.Sequential(nn.Linear(4, self.width), nn.ReLU(), nn.Linear(self.width, 2))


    class OtherTask(SeqTask):
        pass
""")


@pytest.mark.parametrize("spec", ["my_task.py:SeqTask", "/old/checkout/tasks/my_task.py:SeqTask",
                                  "/scratch/job-42/copy/tasks/my_task.py:SeqTask", "tasks.my_task:SeqTask",
                                  "my_task:SeqTask", "my_task/__init__.py:SeqTask"])
def test_every_spelling_of_a_task_is_the_same_task(spec):
    assert task_identity(spec) == "my_task.SeqTask"
    base = FitConfig(task="/old/checkout/tasks/my_task.py:SeqTask", epochs=3)
    assert default_run_dir(base.replace(task=spec), 1) == default_run_dir(base, 1)


def test_other_tasks_are_other_tasks():
    assert task_identity("my_task.py:OtherTask") != task_identity("my_task.py:SeqTask")
    assert task_identity("their_task.py:SeqTask") != task_identity("my_task.py:SeqTask")


def test_a_run_resumes_after_the_checkout_moves_and_by_module_name(tmp_path, monkeypatch, capfd):
    old, new = tmp_path / "old checkout", tmp_path / "moved" / "copy"
    old.mkdir()
    (old / "my_task.py").write_text(TASK_FILE)
    run_dir = str(tmp_path / "run")
    monkeypatch.delitem(sys.modules, "ddp_train_user_my_task", raising=False)

    def run(task: str, steps: int, **args):
        return fit(cfg=FitConfig(task=task, max_steps=steps, batch_size=16, run_dir=run_dir, progress=False, **args))

    assert run(f"{old}/my_task.py:SeqTask", 2).step == 2
    shutil.move(old, new)
    monkeypatch.delitem(sys.modules, "ddp_train_user_my_task")  # a new process would import it afresh
    moved = run(f"{new}/my_task.py:SeqTask", 4)
    assert moved.status == "done" and moved.step == 4
    monkeypatch.syspath_prepend(str(new))
    by_module = run("my_task:SeqTask", 6)
    assert by_module.status == "done" and by_module.step == 6
    err = capfd.readouterr().err
    assert "resumed from" in err and err.count("resumed from") == 2, err
    with pytest.raises(UsageError, match=r"cannot resume .*--task '.*my_task:SeqTask' -> '.*my_task.py:OtherTask'"):
        run(f"{new}/my_task.py:OtherTask", 8)
    with pytest.raises(UsageError, match=r"cannot resume .*--task-arg"):
        run("my_task:SeqTask", 8, task_args={"width": 9})


def test_continuing_a_run_whose_task_file_moved_says_to_name_it_anew(tmp_path):
    from ddp_train.config import build_config

    gone = tmp_path / "gone" / "my_task.py"
    with pytest.raises(UsageError, match=r"my_task.py does not exist; if the code moved, name the file where it is "
                                         r"now \(a run continues with its Task named from anywhere\)$"):
        fit(cfg=build_config({"task": f"{gone}:SeqTask", "run_dir": str(tmp_path / "run")}))
