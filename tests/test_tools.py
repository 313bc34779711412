"""The toolbox commands: evaluate, predict, summary, plot, env, bench."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import BIN, ROOT, base_env
from ddp_train.cli import app, main
from ddp_train.errors import UsageError
from ddp_train.models import build_model
from ddp_train.tools.environment import environment_warnings, resolve
from ddp_train.tools.predict import csv_rows, in_order

TOOLS = ["evaluate", "predict", "summary", "plot", "env", "bench"]
LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "CUDA_VISIBLE_DEVICES"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def invoke(*args: str, env: dict | None = None):
    """Run a command in this process as one process would (no launcher variables leak in)."""
    clean = {k: None for k in LAUNCH_VARS if k != "CUDA_VISIBLE_DEVICES"}
    return CliRunner().invoke(app, list(args), env={**clean, **(env or {})})


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "ddp_train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=base_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real two-epoch run on the bundled digits (359 validation samples)."""
    path = tmp_path_factory.mktemp("tools") / "run"
    result = invoke("fit", "--data", "digits", "--epochs", "2", "--run-dir", str(path), "--no-progress")
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("name", TOOLS)
def test_help_has_examples(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0 and "Examples:" in result.output


def test_cli_import_stays_torch_free():
    code = "import sys, ddp_train.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=base_env(), cwd=ROOT)


def _evaluate(*args: str) -> dict:
    result = invoke("evaluate", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_reproduces_the_runs_validation(run_dir):
    report = _evaluate("--checkpoint", str(run_dir / "checkpoints" / "last.pt"))
    with (run_dir / "history.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert report["samples"] == 359 and report["world_size"] == 1
    assert report["metrics"] == {k: float(last[k]) for k in ("val_loss", "val_acc", "val_f1")}
    table = invoke("evaluate", "-c", str(run_dir / "checkpoints" / "last.pt"))
    assert "val_acc" in table.stdout and "359 samples" in table.stdout


def test_evaluate_bare_state_dict(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=False, map_location="cpu")["model"]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "weights.pt")  # as DDP saved it
    bare = _evaluate("-c", str(tmp_path / "weights.pt"), "--data", "digits", "--model", "mlp")
    assert bare["metrics"] == _evaluate("-c", str(ckpt))["metrics"]
    result = invoke("evaluate", "-c", str(tmp_path / "weights.pt"))
    assert isinstance(result.exception, UsageError) and "--data" in str(result.exception)


def test_evaluate_user_errors_are_one_line(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "-c", str(run_dir / "checkpoints" / "last.pt"), "--split", "test"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: data set digits has no test split; use --split val"


@pytest.mark.slow
def test_evaluate_two_processes_equal_one(run_dir):
    """Nine chunks of 40 dealt 5/4 over two ranks: the very same figures as one process."""
    args = ["--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--batch-size", "40"]
    proc = torchrun("evaluate", "--json", *args)
    two = json.loads(proc.stdout)  # printed once: rank 0 alone
    assert two["world_size"] == 2
    assert two["metrics"] == _evaluate(*args)["metrics"]


def test_predict_csv_and_pt_in_dataset_order(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    assert invoke("predict", "-c", ckpt, "-o", str(tmp_path / "p.csv"), "--batch-size", "40").exit_code == 0
    assert invoke("predict", "-c", ckpt, "-o", str(tmp_path / "p.pt"), "--batch-size", "40").exit_code == 0
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    raw = torch.load(tmp_path / "p.pt", weights_only=True)
    assert [int(r["index"]) for r in rows] == list(range(359)) == raw["index"].tolist()
    assert raw["outputs"].shape == (359, 10)
    assert [int(r["predicted"]) for r in rows] == raw["outputs"].argmax(1).tolist()
    assert list(rows[0]) == ["index", "predicted", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) >= float(r["prob_3"]) for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.pt"]  # no temporary files left
    bad = invoke("predict", "-c", ckpt, "-o", str(tmp_path / "p.txt"))
    assert isinstance(bad.exception, UsageError)


@pytest.mark.slow
def test_predict_two_processes_write_once_in_order(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    proc = torchrun("predict", "-c", ckpt, "-o", str(tmp_path / "two.pt"), "--batch-size", "40")
    assert proc.stderr.count("wrote 359 predictions") == 1
    invoke("predict", "-c", ckpt, "-o", str(tmp_path / "one.pt"), "--batch-size", "40")
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert torch.equal(one["index"], two["index"]) and torch.equal(one["outputs"], two["outputs"])


def test_predict_helpers():
    pieces = in_order([[(0, torch.tensor([[0.0]])), (2, torch.tensor([[2.0]]))], [(1, torch.tensor([[1.0]]))]])
    assert pieces.flatten().tolist() == [0.0, 1.0, 2.0]
    assert csv_rows(torch.tensor([[1.5], [2.5]]), "regression", 3) == (["index", "value"], [[0, "1.5"], [1, "2.5"]])
    header, _ = csv_rows(torch.zeros(2, 2), "regression", 3)
    assert header == ["index", "value_0", "value_1"]
    header, rows = csv_rows(torch.tensor([[0.0, 5.0]]), "classification", 3)  # top-k capped at 2 classes
    assert header == ["index", "predicted", "class_1", "prob_1", "class_2", "prob_2"] and rows[0][1] == 1
    _, rows = csv_rows(torch.tensor([[0.0, 5.0]]), "classification", 2, ["cat", "dog"])  # image folders
    assert rows[0][:3] == [0, "dog", "dog"] and rows[0][4] == "cat"


def test_summary_counts_the_classic_cnn():
    result = invoke("summary", "--model", "cnn", "--input-shape", "1,28,28", "--classes", "10")
    assert result.exit_code == 0, result.output
    expected = sum(p.numel() for p in build_model("cnn", (1, 28, 28), 10).parameters())
    assert expected == 53_994
    assert f"Total params: {expected:,}" in result.stdout
    assert "conv2 (Conv2d)" in result.stdout and "[1, 64, 9, 9]" in result.stdout and "51,264" in result.stdout
    assert "Estimated Total Size (MB)" in result.stdout


def test_plot_writes_png(run_dir, monkeypatch):
    result = invoke("plot", str(run_dir))
    assert result.exit_code == 0, result.output
    assert (run_dir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    missing = invoke("plot", str(run_dir))
    assert isinstance(missing.exception, UsageError) and "ddp-train[plot]" in str(missing.exception)


def test_plot_without_history(tmp_path):
    result = invoke("plot", str(tmp_path))
    assert isinstance(result.exception, UsageError) and "history.csv" in str(result.exception)


def test_env_reports_single_launch():
    result = invoke("env")
    assert result.exit_code == 0, result.output
    assert "launch     single" in result.stdout and "gloo       available" in result.stdout
    if sys.platform.startswith("linux"):
        assert "CPU runs keep blocks up to 256 MiB in the heap" in result.stdout
        mine = invoke("env", "--json", env={"MALLOC_TRIM_THRESHOLD_": "131072"})
        assert "your MALLOC_* / GLIBC_TUNABLES settings" in json.loads(mine.stdout)["malloc"]


def test_env_shows_bad_settings_as_warnings():
    result = invoke("env", "--json", env={"WORLD_SIZE": "2"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["launch"] is None and "RANK is not" in report["warnings"][0]


def test_environment_warnings():
    assert "--ntasks-per-node" in environment_warnings({"SLURM_NTASKS": "4"}, 0)[0]
    assert "hides every GPU" in environment_warnings({"CUDA_VISIBLE_DEVICES": ""}, 0)[0]
    assert "lists 2 devices but 1" in environment_warnings({"CUDA_VISIBLE_DEVICES": "0,7"}, 1)[0]
    assert environment_warnings({"CUDA_VISIBLE_DEVICES": "0,1"}, 2) == []
    launch, warnings = resolve({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4"}, 0)
    assert launch["launcher"] == "single" and "runs alone" in warnings[0]
    launch, warnings = resolve({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1",
                                "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, 0)
    assert launch["launcher"] == "slurm" and launch["rank"] == 1 and warnings == []


def test_bench_quick_cpu():
    result = invoke("bench", "--quick", "--device", "cpu", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.output
    (cpu,) = json.loads(result.stdout)["results"]
    assert cpu["device"] == "cpu" and cpu["matmul_gflops"] > 0 and cpu["speedup_matmul"] == 1.0
    assert cpu["linreg_w"] == pytest.approx([2.0, -3.0], abs=0.1) and cpu["linreg_b"] == pytest.approx(10.0, abs=0.1)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in invoke("bench", "--quick", "--repeats", "1").stdout
        assert isinstance(invoke("bench", "--device", "cuda").exception, UsageError)


@pytest.mark.gpu
@needs_cuda
def test_bench_quick_gpu():
    result = invoke("bench", "--quick", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.output
    gpus = [r for r in json.loads(result.stdout)["results"] if r["device"].startswith("cuda")]
    assert len(gpus) == torch.cuda.device_count()
    assert all(r["h2d_pinned_gbs"] > 0 and r["h2d_pageable_gbs"] > 0 and r["speedup_matmul"] > 0 for r in gpus)


@pytest.mark.gpu
@needs_cuda
def test_evaluate_on_gpu_matches_cpu(run_dir):
    args = ["evaluate", "--json", "-c", str(run_dir / "checkpoints" / "last.pt")]
    gpu = _evaluate(*args[2:])
    cpu = subprocess.run([sys.executable, "-m", "ddp_train", *args], capture_output=True, text=True, check=True,
                         env=base_env(CUDA_VISIBLE_DEVICES=""), cwd=ROOT)
    cpu = json.loads(cpu.stdout)
    assert gpu["device"] == "cuda:0" and cpu["device"] == "cpu"
    assert gpu["metrics"] == pytest.approx(cpu["metrics"], rel=1e-4)
