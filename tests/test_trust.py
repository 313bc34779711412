"""Opening a file never runs code: crafted checkpoints and run directories against every entry point.

Each payload, if it ran, would create a marker file (by unpickling `open(marker, "w")`, or by
calling code a config names). Every case must be refused with the documented message, and the
marker must never appear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from typer.testing import CliRunner

from ddp_train.cli import app
from ddp_train.errors import UsageError
from ddp_train.integrity import crc32_of

PICKLE_REFUSAL = ("holds pickled Python objects", "because unpickling can run arbitrary code")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")
OPTS = ["--data", "synthetic", "--input-shape", "8", "--classes", "3", "--samples", "64", "--val-samples", "16",
        "--model", "mlp", "--hidden", "8", "--batch-size", "16", "--no-progress"]


class Payload:
    """Unpickling this object opens (creates) the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={k: None for k in LAUNCH_VARS})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain and a sharded (FSDP in one process) run of two steps."""
    root = tmp_path_factory.mktemp("trust")
    for name, extra in (("plain", []), ("sharded", ["--strategy", "fsdp"])):
        result = invoke("fit", *OPTS, "--max-steps", "2", "--run-dir", str(root / name), *extra)
        assert result.exit_code == 0, result.output
    return root


def _forge_manifest(folder: Path) -> None:
    """What an attacker does after editing the files: a COMPLETE marker that matches them."""
    files = {p.name: {"size": p.stat().st_size, "crc32": crc32_of(p)} for p in folder.iterdir()
             if p.is_file() and p.name != "COMPLETE"}
    (folder / "COMPLETE").write_text(json.dumps(files))


def plain_pickle(runs: Path, dst: Path, marker: Path) -> Path:
    ckpt = torch.load(runs / "plain" / "checkpoints" / "last.pt", weights_only=True)
    ckpt["model"]["extra"] = Payload(marker)
    torch.save(ckpt, dst / "last.pt")
    return dst / "last.pt"


def dcp_metadata(runs: Path, dst: Path, marker: Path) -> Path:
    out = shutil.copytree(runs / "sharded" / "checkpoints" / "last", dst / "last")
    (out / ".metadata").write_bytes(__import__("pickle").dumps(Payload(marker)))
    _forge_manifest(out)
    return out


def dcp_entry(runs: Path, dst: Path, marker: Path) -> Path:
    """A shard file whose non-tensor entries (the optimizer's param_groups, a model entry) unpickle the payload."""
    src = runs / "sharded" / "checkpoints" / "last"
    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(src), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    state["model"]["payload"] = Payload(marker)
    out = dst / "last"
    out.mkdir()
    dcp.save(state, storage_writer=FileSystemWriter(out, single_file_per_rank=True), no_dist=True)
    shutil.copy(src / "extra.pt", out / "extra.pt")
    _forge_manifest(out)
    return out


def dcp_extra(runs: Path, dst: Path, marker: Path) -> Path:
    out = shutil.copytree(runs / "sharded" / "checkpoints" / "last", dst / "last")
    torch.save({"step": Payload(marker)}, out / "extra.pt")
    _forge_manifest(out)
    return out


PAYLOADS = {"plain pickle": plain_pickle, "DCP .metadata pickle": dcp_metadata, "DCP shard entry pickle": dcp_entry,
            "DCP extra.pt pickle": dcp_extra}


ENTRY_POINTS = ("fit resume", "fit --init-from", "evaluate", "predict", "export", "summary")


def _entry_points(ckpt: Path, tmp: Path, sharded: bool) -> dict:
    strategy = ["--strategy", "fsdp"] if sharded else []
    resume_dir = tmp / "resume"
    (resume_dir / "checkpoints").mkdir(parents=True)
    shutil.move(str(ckpt), resume_dir / "checkpoints" / ckpt.name)
    ckpt = resume_dir / "checkpoints" / ckpt.name
    return {
        "fit resume": lambda: invoke("fit", *OPTS, "--max-steps", "3", "--run-dir", str(resume_dir), *strategy),
        "fit --init-from": lambda: invoke("fit", *OPTS, "--max-steps", "1", "--run-dir", str(tmp / "new"),
                                          "--init-from", str(ckpt)),
        "evaluate": lambda: invoke("evaluate", "-c", str(ckpt)),
        "predict": lambda: invoke("predict", "-c", str(ckpt), "-o", str(tmp / "p.csv")),
        "export": lambda: invoke("export", str(ckpt), "-o", str(tmp / "w.pt")),
        "summary": lambda: invoke("summary", "--checkpoint", str(ckpt)),
    }


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_pickle_in_any_checkpoint_file_never_runs_at_any_entry_point(runs, tmp_path, payload):
    marker = tmp_path / "marker"
    refused = {}
    for entry in ENTRY_POINTS:
        case = tmp_path / entry.replace(" ", "_").replace("-", "")
        points = _entry_points(PAYLOADS[payload](runs, _fresh(case / "src"), marker), case, "DCP" in payload)
        result = points[entry]()
        message = str(result.exception)
        assert isinstance(result.exception, UsageError), (entry, result.output, result.exception)
        assert all(part in message for part in PICKLE_REFUSAL), (entry, message)
        assert not marker.exists(), f"{payload} ran code at {entry}"
        refused[entry] = message
    assert len(refused) == 6
    print(payload, "refused at", ", ".join(refused), "- code ran: 0")


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def _with_config(runs: Path, dst: Path, sharded: bool, **config) -> Path:
    """A clean checkpoint (loads with weights_only) whose recorded config names code."""
    if sharded:
        out = shutil.copytree(runs / "sharded" / "checkpoints" / "last", dst / "last")
        extra = torch.load(out / "extra.pt", weights_only=True)
        extra["config"].update(config)
        torch.save(extra, out / "extra.pt")
        _forge_manifest(out)
        return out
    from ddp_train.checkpoint import atomic_save

    ckpt = torch.load(runs / "plain" / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"].update(config)
    atomic_save(ckpt, dst / "last.pt")
    return dst / "last.pt"


def _task_file(tmp: Path, marker: Path) -> str:
    path = tmp / f"evil_task_{tmp.name}.py"  # a module name of its own: imported files are cached by name
    path.write_text(f"open({str(marker)!r}, 'w')\nfrom ddp_train import Task\nclass T(Task):\n    pass\n")
    return f"{path}:T"


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_code_named_in_a_checkpoint_config_runs_only_when_named(runs, tmp_path, sharded):
    marker = tmp_path / "marker"
    codes = {"data os:system": {"data": "os:system", "data_dir": f"touch {marker}"},
             "task file.py:T": {"task": _task_file(tmp_path, marker), "data": "digits", "model": None}}
    for name, config in codes.items():
        spec = config.get("task") or config["data"]
        for entry in ("evaluate", "predict", "summary"):
            ckpt = _with_config(runs, _fresh(tmp_path / f"{name}-{entry}".replace(" ", "_").replace(":", "")),
                                sharded, **config)
            args = {"evaluate": ["evaluate", "-c", str(ckpt)],
                    "predict": ["predict", "-c", str(ckpt), "-o", str(tmp_path / "p.csv")],
                    "summary": ["summary", "--checkpoint", str(ckpt)]}[entry]
            result = invoke(*args)
            assert isinstance(result.exception, UsageError), (entry, result.output)
            assert str(result.exception) == (f"{ckpt} names code to run ({spec}); a checkpoint's code runs only when "
                                             f"you name it: after reading that code, pass --trust-code {spec}")
            assert not marker.exists(), f"{name} ran at {entry}"
    # Named by the user, the task's code runs (the refusal is not a blanket ban).
    ckpt = _with_config(runs, _fresh(tmp_path / "named"), sharded, **codes["task file.py:T"])
    named = invoke("evaluate", "-c", str(ckpt), "--trust-code", codes["task file.py:T"]["task"])
    assert marker.exists(), (named.output, named.exception)


def test_code_named_in_a_run_directory_config_runs_only_when_named(runs, tmp_path):
    marker = tmp_path / "marker"
    for name, config in {"data": {"data": "os:system", "data_dir": f"touch {marker}"},
                         "task": {"task": _task_file(tmp_path, marker)},
                         "model": {"model": "os:system"}}.items():
        run_dir = tmp_path / name
        shutil.copytree(runs / "plain", run_dir)
        saved = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({**saved, **config}))
        result = invoke("fit", "--run-dir", str(run_dir), "--max-steps", "3", "--no-progress")
        option, spec = next((f"--{k}", v) for k, v in config.items() if k != "data_dir")
        assert isinstance(result.exception, UsageError), result.output
        assert str(result.exception) == (f"{run_dir / 'config.json'} names code to run ({option} {spec}); a run "
                                         "directory's code runs only when you name it: after reading that code, "
                                         f"repeat {option} {spec}")
        assert not marker.exists()


@pytest.mark.parametrize("name", ["history.csv", "metrics.jsonl", "config.json"])
def test_run_files_are_never_written_through_a_symbolic_link(runs, tmp_path, name):
    run_dir = shutil.copytree(runs / "plain", tmp_path / "run")
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(outside)
    result = invoke("fit", *OPTS, "--max-steps", "3", "--run-dir", str(run_dir))
    assert outside.read_text() == "precious\n"
    assert isinstance(result.exception, UsageError), result.output
    assert str(result.exception) == (f"{run_dir / name} is a symbolic link; ddp_train writes its run files only "
                                     f"inside the run directory: remove the link (rm {run_dir / name}) and run again")
    assert (run_dir / name).is_symlink() and outside.read_text() == "precious\n"
