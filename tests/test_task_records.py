"""A Task run records only what applies to it; predict and summary treat a Task's model like a
built-in one (probabilities and the class; every parameter in the rows)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from ddp_train import cli, fit
from ddp_train.config import BUILTIN_TASK_ONLY
from ddp_train.tools.summary import layer_rows
from tests.fixtures.tasks import DictTask


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("task") / "run"
    fit(DictTask(hidden=8), max_steps=2, batch_size=16, run_dir=str(run_dir), progress=False)
    return run_dir


def test_a_task_runs_config_json_leaves_out_the_built_in_settings(task_run):
    saved = json.loads((task_run / "config.json").read_text())
    assert not BUILTIN_TASK_ONLY & saved.keys(), sorted(BUILTIN_TASK_ONLY & saved.keys())
    assert saved["task"] == "tests.fixtures.tasks:DictTask" and saved["task_args"]["hidden"] == 8
    assert {"epochs", "max_steps", "batch_size", "lr", "seed", "launch"} <= saved.keys()


def test_predict_on_a_classification_task_writes_probabilities_and_the_class(task_run, tmp_path, capfd):
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "-c", str(task_run / "checkpoints" / "last.pt"), "-o", str(out),
                  "--trust-code", "tests.fixtures.tasks:DictTask"])
    assert e.value.code == 0, capfd.readouterr().err
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "predicted", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == 101 and all(r["predicted"] == r["class_1"] for r in rows)
    assert all(sum(float(r[f"prob_{i}"]) for i in (1, 2, 3)) == pytest.approx(1, abs=1e-5) for r in rows)


class Tied(nn.Module):
    """Attention (its in_proj parameters belong to no leaf layer; eval mode fuses the layer) and a
    head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.head = nn.Linear(16, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.layer(self.embed(idx)))


def test_summary_rows_count_every_parameter():
    net = Tied()
    rows = layer_rows(net, lambda m: m(torch.zeros(2, 5, dtype=torch.long)))
    assert sum(r[3] for r in rows) == sum(p.numel() for p in net.parameters()) == 176 + 2224  # the tied head adds none
    assert any(name == "layer.self_attn" and params == 3 * 16 * 16 + 3 * 16 for name, _, _, params, _ in rows)
