"""First-contact usability: the launch scripts find torchrun without an activated venv, the Slurm
test cluster counts the real cores, packaging metadata, grouped `fit --help`, `--version`, and
"did you mean" hints for model names, TOML keys and options."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, base_env
from ddp_train import cli
from ddp_train.config import FIELDS, option_name

VENV = Path(sys.executable).parent.parent  # the venv running the tests: it has torchrun
BARE_PATH = "/usr/bin:/bin"  # no venv on it


def checkout(tmp_path: Path, script: str, venv: Path | None) -> Path:
    """A copy of launch/SCRIPT in a fake checkout whose .venv is VENV (or absent)."""
    (tmp_path / "launch").mkdir(parents=True)
    copy = tmp_path / "launch" / script
    shutil.copy2(ROOT / "launch" / script, copy)
    shutil.copy2(ROOT / "launch" / "torchrun.sh", tmp_path / "launch" / "torchrun.sh")
    if venv is not None:
        (tmp_path / ".venv").symlink_to(venv)
    return copy


def fake_venv(folder: Path) -> Path:
    """A venv whose bin/torchrun only prints its arguments (to see which torchrun a script picks)."""
    (folder / "bin").mkdir(parents=True)
    stub = folder / "bin" / "torchrun"
    stub.write_text(f'#!/bin/sh\necho "{folder.name} torchrun $*"\n')
    stub.chmod(0o755)
    return folder


MULTINODE_VARS = {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1"}


def launch(script: Path, *args: str, path: str = BARE_PATH, **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in base_env(PATH=path, **variables).items() if k != "TORCHRUN"}
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_local_sh_runs_the_checkouts_venv_torchrun_without_path(tmp_path):
    """The real torchrun of the repo's .venv, with nothing of the venv on PATH: `fit --help` runs."""
    script = checkout(tmp_path, "local.sh", VENV)
    proc = launch(script, "--help", NPROC="1")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: " in proc.stdout and "--batch-size" in proc.stdout, proc.stdout


@pytest.mark.parametrize("script, variables", [("local.sh", {"NPROC": "1"}), ("multinode.sh", MULTINODE_VARS)])
def test_launch_scripts_prefer_path_then_the_checkouts_venv(tmp_path, script, variables):
    copy = checkout(tmp_path / "repo", script, fake_venv(tmp_path / "repo-venv"))
    proc = launch(copy, "--epochs", "1", **variables)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("repo-venv torchrun ") and proc.stdout.rstrip().endswith("fit --epochs 1")
    active = fake_venv(tmp_path / "active-venv")  # an activated venv comes first on PATH
    proc = launch(copy, "--epochs", "1", path=f"{active / 'bin'}:{BARE_PATH}", **variables)
    assert proc.stdout.startswith("active-venv torchrun "), proc.stdout + proc.stderr


def test_launch_scripts_prefer_ddp_torchrun_the_quick_exit(tmp_path):
    venv = fake_venv(tmp_path / "repo-venv")
    quick = venv / "bin" / "ddp-torchrun"
    quick.write_text('#!/bin/sh\necho "ddp-torchrun $*"\n')
    quick.chmod(0o755)
    proc = launch(checkout(tmp_path / "repo", "local.sh", venv), "--epochs", "1", NPROC="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ddp-torchrun --standalone"), proc.stdout


@pytest.mark.parametrize("script, variables", [("local.sh", {"NPROC": "1"}), ("multinode.sh", MULTINODE_VARS)])
def test_launch_scripts_without_torchrun_say_make_fit(tmp_path, script, variables):
    copy = checkout(tmp_path, script, None)
    proc = launch(copy, **variables)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "torchrun not found" in lines[0] and "make fit" in lines[0], proc.stderr


def test_slurm_cluster_nodes_get_every_core_even_with_omp_num_threads_1():
    """slurm.conf's CPUs= comes from host_cpus: OMP_NUM_THREADS=1 (what the tests export) must not make it 1."""
    script = ROOT / "ci" / "slurm-cluster.sh"
    assert "cpus=$(host_cpus)" in script.read_text()
    proc = subprocess.run(["bash", "-c", f"source {script} && host_cpus"], capture_output=True, text=True,
                          timeout=30, env=base_env(OMP_THREAD_LIMIT="1"))  # OMP_NUM_THREADS=1 too
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(os.sched_getaffinity(0))


def test_package_metadata_builds_without_deprecation_warnings(tmp_path):
    """setuptools reads pyproject.toml without a warning (a license table is deprecated since 77)."""
    pytest.importorskip("setuptools", minversion="77")  # what pyproject.toml's build-system requires
    for name in ("pyproject.toml", "README.md", "ddp_train/__init__.py"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / "src" / name)
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path)], cwd=tmp_path / "src",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr, proc.stderr
    metadata = (tmp_path / proc.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "Version: 0.1.0" in metadata


def help_sections(text: str) -> dict[str, list[str]]:
    """`--help` output as {heading: [option names]}: a heading is a line like `Data:`."""
    sections: dict[str, list[str]] = {}
    heading = None
    for line in text.splitlines():
        if re.fullmatch(r"\S.*:", line):
            heading = line[:-1]
            sections[heading] = []
        elif heading and re.match(r"  -", line):
            sections[heading].append(line.split()[0].rstrip(","))
    return sections


def fit_help() -> str:
    result = CliRunner().invoke(cli.app, ["fit", "--help"], prog_name="ddp-train")
    assert result.exit_code == 0, result.output
    return result.output


def test_fit_help_groups_the_options_under_headings():
    sections = help_sections(fit_help())
    assert list(sections) == ["Your own Task", "Data", "Model", "Optimisation", "Evaluation and early stopping",
                              "Distributed", "Checkpoints and resume", "Output and logging", "Other"]
    assert {"--task", "--task-arg"} <= set(sections["Your own Task"])
    assert {"--monitor", "--patience", "--eval-every", "--metrics"} <= set(sections["Evaluation and early stopping"])
    assert {"--data", "--data-dir", "--workers"} <= set(sections["Data"])
    assert {"--lr", "--optimizer", "--batch-size", "--epochs"} <= set(sections["Optimisation"])
    assert {"--strategy", "--backend"} <= set(sections["Distributed"])
    assert {"--resume", "--run-dir", "--save-every", "--requeue"} <= set(sections["Checkpoints and resume"])
    assert {"--wandb", "--log-every", "--progress"} <= set(sections["Output and logging"])
    assert sections["Other"] == ["--config", "-h"]
    listed = [name for names in sections.values() for name in names]
    assert sorted(listed) == sorted([option_name(f) for f in FIELDS] + ["--config", "-h"])  # each once


def test_fit_help_shows_a_field_without_a_heading_under_other(monkeypatch):
    """A new FitConfig field that nobody added to FIT_GROUPS still shows."""
    monkeypatch.delitem(cli.FIT_GROUPS, "seed")
    sections = help_sections(fit_help())
    assert "--seed" in sections["Other"] and "--seed" not in sections["Optimisation"]


def test_fit_help_shows_choices_as_the_metavar():
    lines = {line.split()[0]: line for line in fit_help().splitlines() if line.startswith("  --")}
    assert lines["--optimizer"].split()[1] == "[sgd|adam|adamw]"
    assert "[default: adam]" in lines["--optimizer"] and "<str>" not in lines["--optimizer"]
    assert lines["--precision"].split()[1] == "[32|bf16|fp16]"
    assert lines["--preempt-signal"].split()[1] == "[USR1|USR2]"
    assert lines["--scheduler"].split()[1:] == ["[none|cosine|linear|step|onecycle]"]  # help on the next line


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["--version"], []])
def test_help_and_version_do_not_import_torch(argv):
    code = ("import sys; from ddp_train import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=base_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: ddp-train" in proc.stdout or proc.stdout.startswith("ddp-train "), proc.stdout


def main(capfd, argv: list[str]) -> tuple[int, str, str]:
    """`ddp-train ARGV` in this process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capfd.readouterr()
    return exc.value.code, out, err


def test_version(capfd):
    from ddp_train import __version__

    assert main(capfd, ["--version"]) == (0, f"ddp-train {__version__}\n", "")
    assert __version__ == "0.1.0"


def test_bare_command_prints_help_without_an_error(capfd):
    code, out, err = main(capfd, [])
    assert (code, err) == (0, ""), err
    assert out.startswith("Usage: ddp-train [OPTIONS] COMMAND") and "fit " in out and "--version" in out


def test_unknown_fit_option_is_still_one_error_line(capfd):
    code, out, err = main(capfd, ["fit", "--bogus"])
    assert (code, out) == (2, "")
    assert err.splitlines() == ["error: No such option: --bogus (see `ddp-train fit --help`)"]


def fit_opts(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--data", "synthetic", "--input-shape", "3,8,8", "--classes", "4", "--samples", "32",
            "--val-samples", "8", "--batch-size", "8", "--max-steps", "1", "--no-progress",
            "--run-dir", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("model, suggestion", [("resnet19", "resnet18"), ("vit_b16", "vit_b_16"), ("MLP", "mlp")])
def test_unknown_model_suggests_the_closest_name(capfd, tmp_path, model, suggestion):
    code, out, err = main(capfd, fit_opts(tmp_path, "--model", model))
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: unknown model {model!r} (did you mean {suggestion!r}?); choose mlp, "), err


@pytest.mark.parametrize("option, suggestion", [
    ("--learning-rate", "--lr"), ("--num-epochs", "--epochs"), ("--max-epochs", "--epochs"),
    ("--num-workers", "--workers"), ("--gradient-accumulation-steps", "--grad-accum"),
    ("--lr-scheduler", "--scheduler"), ("--LR", "--lr"), ("--learning_rate=0.1", "--lr"),
])
def test_unknown_option_named_as_other_tools_do_suggests_ours(capfd, option, suggestion):
    code, out, err = main(capfd, ["fit", option, *([] if "=" in option else ["1"])])
    name = option.split("=")[0]
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: No such option: {name} (did you mean {suggestion}?) "
                                "(see `ddp-train fit --help`)"]


def test_click_close_matches_are_kept(capfd):
    code, _, err = main(capfd, ["fit", "--momentun", "1"])
    assert code == 2 and "(Possible options: --momentum, --monitor, --no-augment)" in err, err


@pytest.mark.parametrize("key, suggestion", [
    ("learning_rate", "lr"), ("lr_scheduler", "scheduler"), ("num_epochs", "epochs"), ("max_epochs", "epochs"),
    ("num_workers", "workers"), ("gradient_accumulation_steps", "grad_accum"),
    ("accumulate_grad_batches", "grad_accum"), ("batch", "batch_size"), ("batch-sise", "batch_size"),
])
def test_unknown_toml_key_suggests_the_option(capfd, tmp_path, key, suggestion):
    toml = tmp_path / "run.toml"
    toml.write_text(f"{key} = 1\n")
    code, out, err = main(capfd, ["fit", "--config", str(toml)])
    assert (code, out) == (2, "")
    shown = key.replace("-", "_")
    assert err.splitlines() == [f"error: {toml}: unknown key {shown!r} (did you mean {suggestion!r}?); "
                                "valid keys are the fit options"]


def test_aliases_name_existing_options_only():
    from ddp_train.config import ALIASES

    assert set(ALIASES.values()) <= set(FIELDS)
    assert not set(ALIASES) & set(FIELDS)
