"""`ddp-train bench`: the tutorials' CPU-vs-GPU measurements, with warm-up, synchronisation and medians."""

from __future__ import annotations

import json
import time
from enum import Enum
from typing import Annotated, Any, Callable

import typer

from ..errors import UsageError

FULL = {"n": 10_000, "k": 200, "copy_mib": 256, "samples": 1_000_000, "steps": 500}
QUICK = {"n": 1_000, "k": 200, "copy_mib": 8, "samples": 20_000, "steps": 50}


class Target(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    all = "all"


def bench(
    device: Annotated[Target, typer.Option("--device", help="Which devices: cpu, cuda (every visible "
                                           "GPU) or all.")] = Target.all,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats of matmul and copies "
                                         "(the median is reported).")] = 5,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: a smoke test in seconds.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Device speed: matmul GFLOP/s, host-to-device copy GB/s, a linear regression fit; CPU vs GPUs.

    matmul: 10000x200 @ 200x10000 in float32 (40 GFLOP). copy: 256 MiB host->GPU from pinned and
    from pageable memory. linreg: 500 full-batch SGD steps (nn.Linear, MSE, lr 0.1) on 1,000,000
    samples of y = x.[2,-3] + 10 + noise; the final weights should be near [2, -3] and 10.
    Every timing follows a warm-up and torch.cuda.synchronize; matmul and copies report the median.
    The full linreg on a CPU takes tens of seconds.

    Examples:

      ddp-train bench

      ddp-train bench --device cuda --repeats 20 --json

      ddp-train bench --quick
    """
    import torch

    sizes = QUICK if quick else FULL
    gpus = torch.cuda.device_count()
    if device is Target.cuda and gpus == 0:
        raise UsageError("--device cuda: no CUDA GPU is visible (see `ddp-train env`); use --device cpu")
    names = (["cpu"] if device is not Target.cuda else []) + \
            ([f"cuda:{i}" for i in range(gpus)] if device is not Target.cpu else [])
    results = [measure(torch.device(name), sizes, repeats) for name in names]
    cpu = next((r for r in results if r["device"] == "cpu"), None)
    for r in results:
        if cpu is not None:
            r["speedup_matmul"] = r["matmul_gflops"] / cpu["matmul_gflops"]
            r["speedup_linreg"] = cpu["linreg_s"] / r["linreg_s"]
    report = {"sizes": sizes, "repeats": repeats, "results": results,
              "note": None if gpus else "no CUDA GPU visible: CPU only"}
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


def measure(device: Any, sizes: dict[str, int], repeats: int) -> dict[str, Any]:
    import torch

    name = f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    n, k = sizes["n"], sizes["k"]
    a, b = torch.randn(n, k, device=device), torch.randn(k, n, device=device)
    c = torch.empty(n, n, device=device)
    seconds = timed(lambda: torch.matmul(a, b, out=c), device, repeats)
    out = {"device": str(device), "name": name, "matmul_gflops": 2 * n * k * n / seconds / 1e9}
    del a, b, c
    if device.type == "cuda":
        nbytes = sizes["copy_mib"] * 1024 ** 2
        pageable = torch.empty(nbytes // 4)
        dst = torch.empty(nbytes // 4, device=device)
        for kind, src in (("pinned", pageable.pin_memory()), ("pageable", pageable)):
            out[f"h2d_{kind}_gbs"] = nbytes / timed(lambda: dst.copy_(src), device, repeats) / 1e9
    out.update(linreg(device, sizes["samples"], sizes["steps"]))
    return out


def timed(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call, synchronising the GPU around each call."""
    import statistics  # ~20 ms: not at import time of the CLI

    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linreg(device: Any, samples: int, steps: int) -> dict[str, Any]:
    """Full-batch gradient descent on the classic two-feature regression; one timed run after a
    short warm-up run (the first CUDA kernels and allocations are slow)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 2, generator=g)
    y = x @ torch.tensor([[2.0], [-3.0]]) + 10.0 + 2.0 * torch.randn(samples, 1, generator=g)
    x, y = x.to(device), y.to(device)

    def fit(n_steps: int) -> torch.nn.Linear:
        model = torch.nn.Linear(2, 1).to(device)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(n_steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model

    fit(min(steps, 10))
    _sync(device)
    start = time.perf_counter()
    model = fit(steps)
    _sync(device)
    return {"linreg_s": time.perf_counter() - start, "linreg_w": model.weight.flatten().tolist(),
            "linreg_b": model.bias.item()}


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def render(report: dict[str, Any]) -> str:
    s = report["sizes"]
    lines = [f"matmul: {s['n']}x{s['k']} @ {s['k']}x{s['n']} float32, median of {report['repeats']} (GFLOP/s)",
             f"copy:   host->device {s['copy_mib']} MiB from pinned / pageable memory, median (GB/s)",
             f"linreg: {s['steps']} full-batch SGD steps on {s['samples']:,} samples (seconds, final w and b)",
             "speedup vs CPU: matmul / linreg", ""]
    header = f"{'device':<26}{'matmul':>9}{'pinned':>9}{'pageable':>10}{'linreg':>9}  {'w, b':<24}{'speedup':>14}"
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        def gbs(key: str) -> str:
            return f"{r[key]:.1f}" if key in r else "-"
        weights = f"[{r['linreg_w'][0]:.3f}, {r['linreg_w'][1]:.3f}], {r['linreg_b']:.3f}"
        speed = f"{r['speedup_matmul']:.1f}x / {r['speedup_linreg']:.1f}x" if "speedup_matmul" in r else "-"
        label = r["name"] if r["device"] == "cpu" else f"{r['device']} {r['name']}"
        lines.append(f"{label[:25]:<26}{r['matmul_gflops']:>9.1f}{gbs('h2d_pinned_gbs'):>9}"
                     f"{gbs('h2d_pageable_gbs'):>10}{r['linreg_s']:>9.2f}  {weights:<24}{speed:>14}")
    if report["note"]:
        lines += ["", report["note"]]
    return "\n".join(lines)
