"""The command line itself: help texts, option parsing, --config + flags, parse errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT, base_env
from ddp_train import cli
from ddp_train.config import FIELDS, option_name

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich wraps help at the terminal width; keep each option on one line


def invoke(*args: str):
    return runner.invoke(cli.app, list(args), prog_name="ddp-train", env=WIDE)


@pytest.fixture
def captured(monkeypatch):
    """Replace the training run with one that records the FitConfig it was given."""
    import ddp_train.api
    from ddp_train.result import FitResult

    configs = []

    def fake_fit(task=None, cfg=None):
        configs.append(cfg)
        return FitResult(status="done", step=0, epoch=0, run_dir="runs/x")

    monkeypatch.setattr(ddp_train.api, "fit", fake_fit)
    return configs


def test_root_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("fit", "evaluate", "predict", "summary", "plot", "env", "bench"):
        assert f" {command} " in result.output, command


def test_fit_help_lists_every_option_and_examples():
    result = invoke("fit", "--help")
    assert result.exit_code == 0, result.output
    text = result.output
    for name in FIELDS:
        assert option_name(name) in text, name
    assert "--config" in text and "--no-progress" in text and "--no-wandb" in text
    assert "Batch size PER RANK" in text
    assert "Examples" in text and "torchrun --standalone --nproc_per_node=2 -m ddp_train fit" in text


def test_fit_help_keeps_square_brackets():
    """Help texts are printed literally: rich must not take `[sgd|adam|adamw]` or `[rank N]` for markup."""
    text = invoke("fit", "--help").output
    assert "[32|bf16|fp16]" in text  # survives today only because rich tags cannot start with a digit
    for choices in ("[sgd|adam|adamw]", "[none|cosine|linear|step|onecycle]", "[auto|min|max]",
                    "[auto|ddp|dp|single|fsdp]", "[auto|nccl|gloo]"):
        assert choices in text, choices
    assert "prefixed [rank N]" in text


@pytest.mark.parametrize("args, expected", [
    ([], {"progress": True, "wandb": False, "batch_size": 64, "resume": "auto"}),
    (["--no-progress"], {"progress": False}),
    (["--progress"], {"progress": True}),
    (["--no-progress", "--progress"], {"progress": True}),  # the last flag wins
    (["--wandb", "--wandb-project", "p"], {"wandb": True, "wandb_project": "p"}),
    (["--batch-size", "8", "--lr", "0.5", "--epochs", "3", "--max-steps", "7"],
     {"batch_size": 8, "lr": 0.5, "epochs": 3, "max_steps": 7}),
    (["--lr=3e-4"], {"lr": 3e-4}),
    (["--precision", "bf16", "--strategy", "single", "--backend", "gloo", "--resume", "never", "--overwrite"],
     {"precision": "bf16", "strategy": "single", "backend": "gloo", "resume": "never", "overwrite": True}),
    (["--data", "synthetic", "--input-shape", "3,8,8", "--classes", "5", "--no-init-strict"],
     {"data": "synthetic", "input_shape": "3,8,8", "classes": 5, "init_strict": False}),
])
def test_flags_reach_the_config(captured, args, expected):
    result = invoke("fit", *args)
    assert result.exit_code == 0, result.output
    assert len(captured) == 1
    for key, value in expected.items():
        assert getattr(captured[0], key) == value, key


def test_config_file_then_flags(captured, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.5\nseed = 7\nbatch-size = 8\n')
    result = invoke("fit", "--config", str(path), "--lr", "0.01")
    assert result.exit_code == 0, result.output
    cfg = captured[0]
    assert (cfg.lr, cfg.seed, cfg.batch_size) == (0.01, 7, 8)


@pytest.mark.parametrize("argv, words", [
    pytest.param(["fit", "--epochs", "abc"], ["--epochs", "integer", "ddp-train fit --help"], id="bad-int"),
    pytest.param(["fit", "--epochs", "1.5"], ["--epochs", "'1.5' is not an integer"], id="float-for-int"),
    pytest.param(["fit", "--lr", "fast"], ["--lr", "'fast' is not a number", "ddp-train fit --help"], id="bad-float"),
    pytest.param(["fit", "--batchsize", "3"], ["No such option: --batchsize", "--batch-size"], id="unknown-option"),
    pytest.param(["fit", "--lr"], ["'--lr' requires an argument", "ddp-train fit --help"], id="missing-value"),
    pytest.param(["fit", "--wandb=yes"], ["does not take a value", "ddp-train fit --help"], id="flag-with-value"),
    pytest.param(["fit", "surplus"], ["unexpected extra argument", "surplus"], id="extra-argument"),
    pytest.param(["fti"], ["No such command", "fti"], id="unknown-command"),
    pytest.param(["fit", "--precision", "16"], ["--precision must be one of 32, bf16, fp16", "'16'"], id="bad-choice"),
])
def test_parse_errors_are_one_line_with_exit_code_2(capfd, argv, words):
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2, err
    assert "Traceback" not in out + err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def test_config_file_with_flag_override_reaches_the_run(tmp_path):
    """A real (tiny) run: the file's values and the flag that overrides one land in config.json."""
    toml = tmp_path / "run.toml"
    toml.write_text('[fit]\ndata = "synthetic"\ninput-shape = "8"\nclasses = 3\nsamples = 64\nval-samples = 16\n'
                    'model = "mlp"\nhidden = "8"\nbatch-size = 16\nmax-steps = 1\nlr = 0.5\nseed = 7\n'
                    'progress = false\n')
    run_dir = tmp_path / "run"
    result = invoke("fit", "--config", str(toml), "--lr", "0.01", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["lr"] == 0.01  # the flag beats the file
    assert (saved["seed"], saved["hidden"], saved["max_steps"], saved["data"]) == (7, "8", 1, "synthetic")
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_fit_options_are_parsed_without_pydantic():
    """typer converts options through pydantic, whose import costs ~0.15 s of every launch; fit's
    options (and --help, --version) are converted by their FitConfig field types instead."""
    code = ("import sys, ddp_train.cli as c\n"
            "try:\n    c.main(['fit', '--lr', '0.5', '--seed', '3', '--no-progress', '--task-arg', 'a=1'])\n"
            "except SystemExit as e:\n    print(e.code)\n"
            "assert 'pydantic' not in sys.modules, 'pydantic imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stdout + proc.stderr
    assert "--task-arg sets a setting of --task's class" in proc.stderr  # parsed through to the config


def test_cli_import_does_not_import_torch():
    code = "import ddp_train.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
