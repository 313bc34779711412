"""First-step and batch-making failures say what they are, in one line with the user's frame."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp_train import cli
from ddp_train.userfn import data_error, first_step_hint


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("no error")


def _sparse_adam_step():
    emb = nn.Embedding(4, 2, sparse=True)
    opt = torch.optim.Adam(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    opt.step()


def _user_bug():
    return {"ids": 1}["input_ids"]


@pytest.mark.parametrize("fn, expected", [
    (lambda: nn.Linear(10, 2)(torch.randn(4, 5)), "make the model fit the batch's shapes"),
    (lambda: nn.Linear(5, 2)(torch.randn(4, 5, dtype=torch.bfloat16)), "a dtype mismatch"),
    (lambda: nn.functional.cross_entropy(torch.randn(4, 3), torch.ones(4)), "a dtype mismatch"),
    (_sparse_adam_step, "the optimizer failed"),
    (_user_bug, ""),
])
def test_first_step_hint_names_the_kind_of_error(fn, expected):
    hint = first_step_hint(_raised(fn))
    assert hint.startswith(expected) if expected else hint == ""


def test_data_error_names_the_users_frame():
    error = data_error(_raised(_user_bug), "--task t:T", "making a training batch")
    assert str(error).startswith("--task t:T raised KeyError while making a training batch at ")
    assert f"{__file__}:" in str(error) and str(error).endswith(": 'input_ids'")


@pytest.mark.parametrize("task, split, workers", [("BadData", "training", "0"), ("BadData", "training", "1"),
                                                 ("BadValData", "validation", "0")])
def test_a_bad_sample_is_one_error_line_with_its_frame(tmp_path, capfd, task, split, workers):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--task", f"tests.fixtures.tokens:{task}", "--batch-size", "4", "--workers", workers,
                  "--run-dir", str(tmp_path / "r"), "--no-progress", "--max-steps", "2"])
    err = capfd.readouterr().err.rstrip().splitlines()
    assert exit_info.value.code == 2 and sum(line.startswith("error: ") for line in err) == 1, err
    assert err[-1].startswith(f"error: --task tests.fixtures.tokens:{task} raised ValueError while making a {split} "
                              "batch"), err
    assert "tests/fixtures/tokens.py:" in err[-1] and err[-1].endswith("sample 5 is corrupt"), err
