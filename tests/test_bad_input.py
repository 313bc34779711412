"""Bad input to `fit`: one line `error: ...` on rank 0 naming the problem and the fix, exit code 2,
no traceback without --debug, and nothing already saved is lost or overwritten.

Most cases run in-process through `ddp_train.cli.main` (no torch import per case); the checkpoints
they need come from one tiny real run per module, made in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import torch
import typer

import ddp_train
from conftest import ROOT, base_env, fit_cmd, free_port, run_fit
from ddp_train import cli

CUDA = torch.cuda.is_available()


def tiny_opts(run_dir: Path, *extra: str) -> list[str]:
    """The options of conftest's `tiny` fixture, for any run directory (the module fixture needs them)."""
    return ["--data", "synthetic", "--input-shape", "16", "--classes", "4", "--samples", "256",
            "--val-samples", "101", "--model", "mlp", "--hidden", "32", "--batch-size", "16",
            "--run-dir", str(run_dir), "--log-every", "5", "--no-progress", *extra]


class Opaque:
    """A custom class: pickled into a checkpoint, it is what weights_only loading refuses."""

    def __init__(self) -> None:
        self.w = [1.0, 2.0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run directory after a 2-step fit (--hidden 32): config.json, history, last.pt, best.pt."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_fit(1, *tiny_opts(run_dir, "--max-steps", "2"))
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    return run_dir


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fit_error(capfd, argv: list[str]) -> tuple[int, str, str]:
    """Run `ddp-train fit ARGV` in this process; (exit code, stdout, stderr)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", *argv])
    out, err = capfd.readouterr()
    return exc.value.code, out, err


def assert_one_error_line(code: int, out: str, err: str, keywords: list[str]) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in out + err, err
    assert out == "", out
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in keywords:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


class Ctx:
    """What a case builds its arguments from: a copy of the trained run (`run`), its checkpoint,
    a fresh run directory, and the scratch folder."""

    def __init__(self, tmp: Path, trained: Path):
        self.tmp = tmp
        self.run = tmp / "run"
        shutil.copytree(trained, self.run)  # copy2: contents and mtimes preserved
        self.ckpt = self.run / "checkpoints" / "last.pt"
        self.fresh = tmp / "fresh"

    def truncated(self) -> str:
        path = self.tmp / "truncated.pt"
        data = self.ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return str(path)

    def corrupt(self) -> str:
        path = self.tmp / "random.pt"  # a neutral name: the message itself must say "corrupt"
        path.write_bytes(random.Random(0).randbytes(4096))
        return str(path)

    def pickled(self) -> str:
        path = self.tmp / "pickled.pt"
        torch.save({"version": 1, "model": {"w": Opaque()}}, path)
        return str(path)

    def broken_run(self) -> Path:
        """The run with its only resumable checkpoint (last.pt) cut in half."""
        data = self.ckpt.read_bytes()
        self.ckpt.unlink()
        self.ckpt.write_bytes(data[: len(data) // 2])
        return self.run

    def toml(self, text: str) -> str:
        path = self.tmp / "run.toml"
        path.write_text(text)
        return str(path)

    def imagefolder(self, *dirs: str) -> str:
        root = self.tmp / "images"
        for d in dirs:
            (root / d).mkdir(parents=True)
        root.mkdir(exist_ok=True)
        return str(root)

    def blocked(self) -> str:
        """A --run-dir below a regular file: mkdir fails even as root."""
        (self.tmp / "a-file").write_text("not a folder\n")
        return str(self.tmp / "a-file" / "run")


def fresh(*extra: str):
    return lambda c: tiny_opts(c.fresh, *extra)


def on_run(*extra: str):
    return lambda c: tiny_opts(c.run, *extra)


USER = "tests.fixtures.userdefs"
no_cuda = pytest.mark.skipif(CUDA, reason="the machine has CUDA, so this input is valid here")

# id, argv from a Ctx, words the one error line must contain
CASES = [
    pytest.param(on_run("--resume", "/no/such.pt"), ["/no/such.pt", "does not exist"], id="missing-checkpoint"),
    pytest.param(lambda c: tiny_opts(c.run, "--resume", c.truncated()), ["truncated", "another --run-dir"],
                 id="truncated-checkpoint"),
    pytest.param(lambda c: tiny_opts(c.broken_run()), ["no readable checkpoint", "last.pt", "--resume PATH",
                                                       "another --run-dir"], id="auto-resume-all-checkpoints-broken"),
    pytest.param(lambda c: tiny_opts(c.run, "--resume", c.corrupt()), ["random.pt", "corrupt", "another checkpoint"],
                 id="corrupt-checkpoint"),
    pytest.param(lambda c: tiny_opts(c.fresh, "--hidden", "64", "--init-from", str(c.ckpt)),
                 ["--init-from", "does not fit", "1.weight", "(32, 16)", "(64, 16)"], id="init-from-other-model"),
    pytest.param(on_run("--hidden", "64"), ["cannot resume", "hidden", "'32'", "'64'", "another --run-dir"],
                 id="resume-other-model"),
    pytest.param(lambda c: tiny_opts(c.run, "--resume", c.pickled()), ["pickled", "weights_only", "state_dict"],
                 id="pickled-objects"),
    pytest.param(lambda c: tiny_opts(c.fresh, "--init-from", c.pickled()), ["pickled", "weights_only"],
                 id="init-from-pickled-objects"),
    pytest.param(on_run("--batch-size", "8"), ["cannot resume", "--batch-size 16 -> 8"], id="resume-other-batch-size"),
    pytest.param(on_run("--resume", "never"), ["already holds a run", "--overwrite", "--run-dir"],
                 id="resume-never-existing-run"),
    pytest.param(fresh("--precision", "fp16"), ["fp16", "CUDA", "bf16"], id="fp16-on-cpu", marks=no_cuda),
    pytest.param(fresh("--backend", "nccl"), ["nccl", "CUDA", "gloo"], id="nccl-without-cuda", marks=no_cuda),
    pytest.param(fresh("--strategy", "ddp"), ["--strategy ddp", "torchrun"], id="ddp-in-one-process"),
    pytest.param(fresh("--strategy", "dp"), ["--strategy dp", "GPU", "--strategy auto"], id="dp-without-gpus",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 1, reason="several GPUs: dp is valid")),
    pytest.param(lambda c: tiny_opts(c.blocked()), ["cannot write", "a-file", "writable --run-dir"],
                 id="run-dir-not-writable"),
    pytest.param(fresh("--save-every", "0"), ["--save-every must be >= 1"], id="save-every-0"),
    pytest.param(fresh("--keep", "0"), ["--keep must be >= 1"], id="keep-0"),
    pytest.param(fresh("--batch-size", "0"), ["--batch-size must be >= 1", "got 0"], id="batch-size-0"),
    pytest.param(fresh("--lr", "-0.1"), ["--lr must be > 0", "-0.1"], id="negative-lr"),
    pytest.param(fresh("--epochs", "0"), ["--epochs must be >= 1"], id="epochs-0"),
    pytest.param(lambda c: tiny_opts(c.fresh, "--model", "resnet18", "--data", "imagefolder", "--data-dir",
                                     c.imagefolder("train/cat", "val/cat")),
                 ["imagefolder", "no usable images"], id="imagefolder-no-images"),
    pytest.param(lambda c: tiny_opts(c.fresh, "--data", "imagefolder", "--data-dir", c.imagefolder()),
                 ["imagefolder", "train", "missing", "one sub-folder of images per class"],
                 id="imagefolder-no-train-folder"),
    pytest.param(fresh("--data", f"{USER}:nope"), ["--data", "has no 'nope'"], id="user-data-no-function"),
    pytest.param(fresh("--data", "no_such_package.mod:fn"), ["--data", "cannot import no_such_package",
                                                              "PYTHONPATH"], id="user-data-no-module"),
    pytest.param(fresh("--data", f"{USER}:not_a_dict"), ["--data", "must return a dict", "got list"],
                 id="user-data-wrong-type"),
    pytest.param(fresh("--model", f"{USER}:nope"), ["--model", "has no 'nope'"], id="user-model-no-function"),
    pytest.param(fresh("--model", f"{USER}:not_a_module"), ["--model", "torch.nn.Module", "got str"],
                 id="user-model-wrong-type"),
    pytest.param(fresh("--data", "nosuch"), ["unknown data set 'nosuch'", "digits", "synthetic", "linreg"],
                 id="unknown-data"),
    pytest.param(fresh("--model", "nosuch"), ["unknown model 'nosuch'", "mlp", "cnn", "resnet18"],
                 id="unknown-model"),
    pytest.param(lambda c: ["--config", c.toml("learning_rate = 0.1\n"), *tiny_opts(c.fresh)],
                 ["run.toml", "unknown key 'learning_rate'"], id="toml-unknown-key"),
    pytest.param(fresh("--monitor", "val_r2"), ["--monitor val_r2", "not a metric of this run", "val_acc"],
                 id="monitor-not-a-metric"),
    pytest.param(fresh("--data", f"{USER}:labels_out_of_range"), ["train labels run from 0 to 3",
                 "num_outputs is 3", "0..2"], id="labels-out-of-range"),
    pytest.param(lambda c: tiny_opts(c.fresh, "--data", "imagefolder", "--data-dir", str(c.tmp / "nope")),
                 ["--data-dir", "does not exist", "train/ and val/"], id="imagefolder-missing-dir"),
    pytest.param(fresh("--hidden", "a,b"), ["--hidden", "like 128,64"], id="hidden-not-numbers"),
    pytest.param(fresh("--task-arg", "n=1"), ["--task-arg", "pass --task too"], id="task-arg-without-task"),
    pytest.param(fresh("--task", "tests.fixtures.tasks:DictTask", "--task-arg", "oops"), ["--task-arg 'oops'",
                 "KEY=VALUE"], id="task-arg-not-a-pair"),
    pytest.param(lambda c: ["--task", "tests.fixtures.tasks:DictTask", "--task-arg", "nosuch=1", "--run-dir",
                            str(c.fresh)], ["--task tests.fixtures.tasks:DictTask", "TypeError", "nosuch"],
                 id="task-arg-unknown"),
    pytest.param(fresh("--metrics", "auroc,top9"), ["--metrics top9", "auroc"], id="unknown-metric"),
    pytest.param(fresh("--warmup-steps", "5", "--scheduler", "onecycle"), ["onecycle", "--warmup-steps"],
                 id="warmup-with-onecycle"),
    pytest.param(fresh("--pretrained"), ["--pretrained", "--model mlp"], id="pretrained-builtin-model"),
]


# The framework's packages, as folders: a clone or venv in a folder named ddp_train (or with spaces
# in its path) must not make a user's own frames look like the framework's.
def folder(module) -> str:
    return os.path.join(os.path.dirname(module.__file__), "")


OURS = folder(ddp_train)
FRAMEWORK = [OURS] + [folder(m) for m in (typer, click, torch)]


def user_error(capfd, argv: list[str]) -> tuple[int, str]:
    """Run fit; the output must end in one `error:` line and show no framework frames."""
    code, out, err = fit_error(capfd, argv)
    lines = err.rstrip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, err
    for framework in FRAMEWORK:
        assert framework not in err, err
    return code, err


def test_model_that_does_not_fit_the_data(tmp_path, capfd):
    _, err = user_error(capfd, ["--data", f"{USER}:blobs", "--model", f"{USER}:wrong_width", "--run-dir",
                                str(tmp_path / "r"), "--no-progress"])
    assert err.rstrip().splitlines()[-1].startswith(
        f"error: --model {USER}:wrong_width raised RuntimeError while training on the first batch ((64, 5), (64,)): "
        "mat1 and mat2 shapes cannot be multiplied")
    assert err.rstrip().endswith("; make the model fit the batch's shapes")


def test_user_data_function_that_raises(tmp_path, capfd):
    _, err = user_error(capfd, ["--data", f"{USER}:raises", "--run-dir", str(tmp_path / "r")])
    assert "Traceback (your code only" in err and "return rows[0]" in err
    assert err.rstrip().splitlines()[-1] == (f"error: --data {USER}:raises raised IndexError while loading the data: "
                                             "list index out of range")


def test_user_errors_show_everything_with_debug(tmp_path, capfd):
    code, _, err = fit_error(capfd, ["--data", f"{USER}:raises", "--run-dir", str(tmp_path / "r"), "--debug"])
    assert code == 2 and OURS in err and err.rstrip().splitlines()[-1].startswith("error: --data")


def test_two_dimensional_samples_get_a_working_default_model(tmp_path):
    proc = run_fit(1, "--data", f"{USER}:matrices", "--epochs", "1", "--run-dir", str(tmp_path / "m"), "--no-progress")
    assert "done:" in proc.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"] == "mlp"


def test_multi_output_regression_reports_loss_on_one_scale(tmp_path):
    proc = run_fit(1, "--data", f"{USER}:regression3", "--epochs", "2", "--run-dir", str(tmp_path / "r"),
                   "--no-progress", "--lr", "0.01")
    last = proc.stderr.strip().splitlines()[-2]
    figures = dict(zip(last.split()[2::2], map(float, last.split()[3::2])))
    assert figures["val_loss"] == pytest.approx(figures["val_mse"], rel=1e-5), last


def test_overwrite_removes_every_file_of_the_old_run(tmp_path, trained):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "history.png").write_bytes(b"png")
    run_fit(1, *tiny_opts(run, "--max-steps", "1", "--resume", "never", "--overwrite"))
    assert not (run / "history.png").exists()


def test_summary_with_an_input_too_small(capfd):
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["summary", "--model", "cnn", "--input-shape", "1,4,4"])
    err = capfd.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "does not take input of shape (1, 4, 4)" in err


@pytest.mark.parametrize("make_argv, keywords", CASES)
def test_bad_input(tmp_path, trained, capfd, make_argv, keywords):
    before_trained = snapshot(trained)
    ctx = Ctx(tmp_path, trained)
    argv = make_argv(ctx)
    before = snapshot(ctx.run)
    assert_one_error_line(*fit_error(capfd, argv), keywords)
    assert snapshot(ctx.run) == before, "a failed fit changed files of an existing run"
    assert snapshot(trained) == before_trained


def test_debug_shows_the_traceback(tmp_path, capfd):
    code, out, err = fit_error(capfd, tiny_opts(tmp_path / "run", "--data", "nosuch", "--debug"))
    assert code == 2
    assert "Traceback" in err and "UsageError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: unknown data set")


@pytest.mark.slow
def test_more_ranks_than_validation_samples(tmp_path):
    """Every rank finds the problem and exits 2; rank 0 alone says so. (torchrun then exits 1 with
    its own ChildFailedError report, which lists each worker's exit code; as it may SIGTERM the
    second worker first, "every rank" is checked on two processes started without an agent.)"""
    proc = run_fit(2, *tiny_opts(tmp_path / "run", "--val-samples", "1"), check=False)
    output = proc.stdout + proc.stderr
    errors = [ln for ln in output.splitlines() if "error:" in ln]
    assert proc.returncode != 0, output
    assert len(errors) == 1, output
    assert errors[0].startswith("error: the validation set has 1 samples but the job has 2 ranks"), output
    assert "fewer processes or more data" in errors[0]
    # Both workers stop with code 2; torchrun, seeing the first one exit, may SIGTERM the other (-15).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)
    assert "2" in codes and set(codes) <= {"2", "-15"}, output
    assert os.path.join(ROOT, "ddp_train", "") not in output, output  # torchrun's traceback only, none from a worker
    port = str(free_port())
    pair = [subprocess.Popen(fit_cmd(1, *tiny_opts(tmp_path / "pair", "--val-samples", "1")), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank)))
            for rank in range(2)]
    outs = [p.communicate(timeout=180) for p in pair]
    assert [p.returncode for p in pair] == [2, 2], outs
    assert "error:" not in outs[1][1] and outs[0][1].count("error: the validation set has 1 samples") == 1, outs


def test_user_frames_are_told_apart_from_the_frameworks_by_folder_not_by_name(tmp_path):
    """The user's code in a checkout whose path names a framework (a folder `torch`, `ddp_train`,
    spaces) is still the user's: its frames are shown."""
    from ddp_train.userfn import user_frames

    path = tmp_path / "my clone" / "torch" / "ddp_train" / "my_task.py"
    path.parent.mkdir(parents=True)
    path.write_text("def boom():\n    raise ValueError('a bug in my task')\n")
    space: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), space)
    with pytest.raises(ValueError) as e:
        space["boom"]()
    shown = user_frames(e.value)
    assert f'File "{path}", line 2, in boom' in shown and OURS not in shown, shown
