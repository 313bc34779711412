"""GPU benchmark: `ddp-train fit` against hand-written loops on the same GPU, in the same run.

    python benchmarks/gpu_bench.py                      # on a CUDA machine (about 6-8 minutes on one H100)
    python benchmarks/gpu_bench.py --only gpt --steps 40
    python benchmarks/gpu_bench.py --dry-run            # the same code on the CPU at tiny sizes (a smoke test)

Without a CUDA GPU (and without --dry-run) it prints one line and exits 0.

Rows (each tool in a fresh process for ddp-train, in this process for the loops):
  resnet50   ResNet-50, bf16 autocast, channels_last, synthetic 3x224x224 (ddp_train's generator),
             batch 128, SGD: `ddp-train fit` vs a raw loop fed from pinned host memory; samples/s
  gpt        GPT-2 small (124M, benchmarks/gpt_task.py), bf16, batch 8 x 1024 tokens, AdamW, eager and
             --compile: `ddp-train fit --task` vs the raw loop; tokens/s and MFU against the measured
             bf16 GEMM peak (8192^3 matmuls)
  defaults   `ddp-train fit` at its defaults (float32 with TF32 and cudnn.benchmark, pinned copies) vs
             the loop a tutorial teaches (float32 at torch's defaults: no TF32 matmuls, pageable
             copies, a DataLoader with shuffle), on ResNet-50 and on the GPT; samples/s

Throughput is the median over windows of --log-every steps after the first window (ddp-train: its
metrics.jsonl `train` events; the loops: a device sync at the same points). Peak memory is the CUDA
caching allocator's peak allocated bytes. Targets (issue 23): >= 0.98x the raw loop on resnet50 and
gpt, the GPT's MFU within 5 points of the raw loop's, the defaults >= 1.5x the tutorial loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from gpt_task import GPT, flops_per_token, lm_loss, random_tokens  # noqa: E402
from measure import steady_throughput  # noqa: E402

SECTIONS = ("resnet50", "gpt", "defaults")


def sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return dict(image="3,32,32", classes=10, cnn="resnet18", cnn_batch=4, cnn_samples=64, gpt="tiny",
                    gpt_batch=4, gpt_samples=64, gemm=256, steps=6, log_every=2)
    # 2,560 images (1.5 GB in host memory): 20 steps an epoch, the loops wrap around the same way
    return dict(image="3,224,224", classes=1000, cnn="resnet50", cnn_batch=128, cnn_samples=2560, gpt="gpt2-small",
                gpt_batch=8, gpt_samples=1024, gemm=8192, steps=60, log_every=5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device: torch.device, n: int) -> float:
    """Measured dense bf16 matmul FLOP/s: the MFU denominator (datasheet peaks are not reached)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def ddp_train(args: list[str], work: Path, name: str, env: dict[str, str]) -> dict[str, float]:
    """`python -m ddp_train fit ARGS` in a fresh process: steady samples/s and peak memory."""
    run_dir = work / name
    cmd = [sys.executable, "-m", "ddp_train", "fit", *args, "--run-dir", str(run_dir), "--no-progress",
           "--resume", "never", "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"ddp-train fit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    return {"samples_per_s": steady_throughput(events)["median"],
            "peak_mem_gib": train[-1].get("max_mem_allocated_gib")}


def raw_loop(step: Callable[[int], None], steps: int, log_every: int, batch: int,
             device: torch.device) -> dict[str, float]:
    """Time `step(i)` like ddp-train's log lines: the rate of each window of `log_every` steps after
    the first window, median; peak allocated memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates, t0 = [], None
    for i in range(steps):
        step(i)
        if (i + 1) % log_every == 0:
            sync(device)
            now = time.perf_counter()
            if t0 is not None:
                rates.append(batch * log_every / (now - t0))
            t0 = now
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"samples_per_s": statistics.median(rates), "peak_mem_gib": peak}


def image_data(s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """ddp_train's synthetic images (the same tensors `--data synthetic` trains on)."""
    from ddp_train.config import FitConfig
    from ddp_train.data import synthetic

    cfg = FitConfig(data="synthetic", input_shape=s["image"], classes=s["classes"], samples=s["cnn_samples"],
                    val_samples=16)
    train = synthetic(cfg).train
    return train.x, train.y


def image_model(s: dict[str, Any], device: torch.device, channels_last: bool) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, s["cnn"])(num_classes=s["classes"]).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def raw_image_loop(s: dict[str, Any], device: torch.device, precision: str, channels_last: bool,
                   tutorial: bool = False) -> dict[str, float]:
    """The leanest correct loop (pinned, non-blocking copies, fused SGD, bf16 autocast), or with
    `tutorial` what the tutorials teach (a DataLoader with shuffle, pageable `.to(device)`)."""
    x, y = image_data(s)
    model = image_model(s, device, channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **({} if tutorial else {"fused": True}))
    b = s["cnn_batch"]
    loss_fn = nn.CrossEntropyLoss()
    dtype = torch.bfloat16 if precision == "bf16" else None
    if tutorial:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b, shuffle=True)
        batches = iter(loader)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        nonlocal batches
        if tutorial:
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(loader)
                xb, yb = next(batches)
            xb, yb = xb.to(device), yb.to(device)
        else:
            idx = perm[(i * b) % (len(x) - b + 1):][:b]
            pin = device.type == "cuda"
            xb, yb = ((t.pin_memory() if pin else t) for t in (x[idx], y[idx]))
            xb = xb.to(device, non_blocking=True, memory_format=torch.channels_last if channels_last else
                       torch.contiguous_format)
            yb = yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return raw_loop(step, s["steps"], s["log_every"], b, device)


def raw_gpt_loop(s: dict[str, Any], device: torch.device, precision: str, compile: bool) -> dict[str, float]:
    x, y = random_tokens(s["gpt"], s["gpt_samples"])
    torch.manual_seed(0)
    model = GPT(s["gpt"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile else model
    b = s["gpt_batch"]
    dtype = torch.bfloat16 if precision == "bf16" else None
    pin = device.type == "cuda"

    def step(i: int) -> None:
        lo = (i * b) % (len(x) - b + 1)
        xb, yb = ((t[lo:lo + b].pin_memory() if pin else t[lo:lo + b]).to(device, non_blocking=True) for t in (x, y))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = lm_loss(fwd(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return raw_loop(step, s["steps"], s["log_every"], b, device)


class Bench:
    def __init__(self, dry: bool, steps: int | None, work: Path):
        self.dry, self.work = dry, work
        self.s = sizes(dry)
        if steps:
            self.s["steps"] = steps
        self.device = torch.device("cpu" if dry else "cuda")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"
                    if dry else os.environ.get("OMP_NUM_THREADS", "4")}
        if dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
            torch.set_num_threads(1)  # as the ddp-train processes (OMP_NUM_THREADS=1)
        self.rows: list[dict[str, Any]] = []
        self.peak = gemm_peak(self.device, self.s["gemm"])

    def common(self) -> list[str]:
        s = self.s
        return ["--max-steps", str(s["steps"]), "--log-every", str(s["log_every"]), "--epochs", "1000",
                "--eval-batch-size", "16"]

    def image_args(self, fast: bool) -> list[str]:
        s = self.s
        args = ["--data", "synthetic", "--input-shape", s["image"], "--classes", str(s["classes"]), "--samples",
                str(s["cnn_samples"]), "--val-samples", "16", "--model", s["cnn"], "--batch-size",
                str(s["cnn_batch"]), "--optimizer", "sgd", "--lr", "0.1", *self.common()]
        return args + (["--precision", "bf16", "--channels-last"] if fast else [])

    def gpt_args(self, precision: str, compile: bool) -> list[str]:
        s = self.s
        return ["--task", str(HERE / "gpt_task.py") + ":GPTTask", "--task-arg", f"size={s['gpt']}", "--task-arg",
                f"samples={s['gpt_samples']}", "--batch-size", str(s["gpt_batch"]), "--optimizer", "adamw", "--lr",
                "6e-4", "--precision", precision, *self.common(), *(["--compile"] if compile else [])]

    def row(self, name: str, ours: dict[str, float], theirs: dict[str, float], unit: str = "samples/s",
            per_sample: float = 1.0, flops: float | None = None) -> None:
        row: dict[str, Any] = {"row": name, "unit": unit}
        for who, r in (("ddp_train", ours), ("raw", theirs)):
            row[who] = round(r["samples_per_s"] * per_sample, 1)
            row[f"{who}_peak_mem_gib"] = r["peak_mem_gib"]
            if flops is not None:
                row[f"{who}_mfu"] = round(100 * r["samples_per_s"] * per_sample * flops / self.peak, 2)
        row["ratio"] = round(ours["samples_per_s"] / theirs["samples_per_s"], 3)
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def resnet50(self) -> None:
        ours = ddp_train(self.image_args(fast=True), self.work, "resnet", self.env)
        self.row(f"{self.s['cnn']}_bf16_channels_last", ours, raw_image_loop(self.s, self.device, "bf16", True))

    def gpt(self) -> None:
        block = random_tokens(self.s["gpt"], 1)[0].shape[1]
        flops = flops_per_token(self.s["gpt"])
        for compile in (False, True):
            if compile and self.dry:
                self.rows.append({"row": "gpt_bf16_compile", "skip": "--dry-run: no compile on the CPU smoke test"})
                continue
            ours = ddp_train(self.gpt_args("bf16", compile), self.work, f"gpt{int(compile)}", self.env)
            theirs = raw_gpt_loop(self.s, self.device, "bf16", compile)
            self.row(f"gpt_bf16_{'compile' if compile else 'eager'}", ours, theirs, "tokens/s", block, flops)

    def defaults(self) -> None:
        ours = ddp_train(self.image_args(fast=False), self.work, "defaults_cnn", self.env)
        with tutorial_numerics():
            theirs = raw_image_loop(self.s, self.device, "32", False, tutorial=True)
        self.row(f"defaults_vs_tutorial_{self.s['cnn']}_fp32", ours, theirs)
        block = random_tokens(self.s["gpt"], 1)[0].shape[1]
        ours = ddp_train(self.gpt_args("32", False), self.work, "defaults_gpt", self.env)
        with tutorial_numerics():
            theirs = raw_gpt_loop(self.s, self.device, "32", False)
        self.row("defaults_vs_tutorial_gpt_fp32", ours, theirs, "tokens/s", block)


class tutorial_numerics:
    """torch's own defaults, whatever this process set before: float32 matmuls in full precision,
    no cuDNN autotuning (cuDNN's TF32 for convolutions is on by torch's default and stays on)."""

    def __enter__(self) -> None:
        self.saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *exc: Any) -> None:
        torch.set_float32_matmul_precision(self.saved[0])
        torch.backends.cudnn.benchmark = self.saved[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--steps", type=int, help="steps per run (default 60; 6 with --dry-run)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: skipped: no CUDA GPU visible (--dry-run runs the same code on the CPU at tiny sizes)")
        return 0
    wanted = [w for w in args.only.split(",") if w]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        p.error(f"--only {','.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    with tempfile.TemporaryDirectory(prefix="gpu_bench.") as tmp:
        bench = Bench(args.dry_run, args.steps, Path(tmp))
        device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
        print(f"gpu_bench: {device}, torch {torch.__version__}, measured bf16 GEMM peak "
              f"{bench.peak / 1e12:.1f} TFLOP/s{' (dry run: the figures mean nothing)' if args.dry_run else ''}",
              flush=True)
        for name in wanted:
            getattr(bench, name)()
    result = {"device": device, "torch": torch.__version__, "bf16_gemm_peak_tflops": round(bench.peak / 1e12, 2),
              "rows": bench.rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
