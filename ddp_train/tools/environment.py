"""`ddp-train env`: library versions, devices, and what launch detection resolves right now."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Mapping

import typer

from ..cpu_malloc import describe as describe_malloc
from ..distenv import DistEnv
from ..errors import UsageError

LAUNCH_KEYS = ("launcher", "rank", "local_rank", "world_size", "local_world_size", "master_addr",
               "master_port", "backend", "device", "run_id", "restart_count")


def env(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:
    """Versions (torch, CUDA, cuDNN, NCCL, gloo), GPUs, malloc, and the launch this process would join.

    The launch part is what `fit` would derive from the environment here: launcher, rank, local
    rank, world size, master address and port, backend and device, with warnings for settings
    that do not add up. Run it inside your sbatch script or under torchrun to check them.

    Examples:

      ddp-train env

      srun --ntasks-per-node=4 ddp-train env         # one report per task

      torchrun --standalone --nproc_per_node=2 -m ddp_train env --json
    """
    report = collect(os.environ)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render(report))


def collect(environ: Mapping[str, str]) -> dict[str, Any]:
    import platform

    import torch
    import torch.distributed as dist

    gpus = [_gpu(i) for i in range(torch.cuda.device_count())]
    launch, warnings = resolve(environ, len(gpus), torch.version.cuda is not None)
    nccl = None
    if dist.is_nccl_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # a build without the NCCL library loaded
            nccl = "available"
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": str(torch.__version__), "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": _cudnn(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "nccl": nccl, "gloo": dist.is_gloo_available(), "mpi": dist.is_mpi_available(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "malloc": describe_malloc(environ), "gpus": gpus,
        "launch": launch, "warnings": warnings,
    }


def _cudnn(version: int | None) -> str | None:
    """torch gives one integer: 8906 is 8.9.6, 90100 is 9.1.0 (cuDNN 9 widened the minor field)."""
    if not version:
        return None
    major, rest = (version // 10000, version % 10000) if version >= 90000 else (version // 1000, version % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _gpu(i: int) -> dict[str, Any]:
    import torch

    p = torch.cuda.get_device_properties(i)
    return {"index": i, "name": p.name, "memory_gib": round(p.total_memory / 1024 ** 3, 1),
            "capability": f"{p.major}.{p.minor}"}


def resolve(environ: Mapping[str, str], cuda_devices: int, cuda_build: bool = True
            ) -> tuple[dict[str, Any] | None, list[str]]:
    """What DistEnv.from_environ makes of `environ` (None if it refuses), and warnings."""
    general = environment_warnings(environ, cuda_devices, cuda_build)
    try:
        denv = DistEnv.from_environ(environ, cuda_devices=cuda_devices)
    except UsageError as e:
        return None, [str(e)] + general
    warnings = []
    if denv.launcher == "single" and _int(environ.get("SLURM_NTASKS")) > 1:
        warnings.append(f"SLURM_NTASKS={environ['SLURM_NTASKS']} but this process runs alone (no srun step "
                        "with several tasks): a batch script runs once; start the ranks with `srun ddp-train "
                        "fit ...`, or use --ntasks-per-node=1 and torchrun inside srun")
    if cuda_devices > 1 and denv.local_world_size > cuda_devices:
        warnings.append(f"{denv.local_world_size} processes per node but {cuda_devices} GPUs visible: "
                        "local ranks beyond them have no GPU")
    return {k: getattr(denv, k) for k in LAUNCH_KEYS}, warnings + general


def environment_warnings(environ: Mapping[str, str], cuda_devices: int, cuda_build: bool = True) -> list[str]:
    out = []
    ntasks = _int(environ.get("SLURM_NTASKS"))
    if ntasks > 1 and "SLURM_NTASKS_PER_NODE" not in environ:
        out.append(f"SLURM_NTASKS={ntasks} without --ntasks-per-node: Slurm may spread the tasks unevenly "
                   f"(SLURM_TASKS_PER_NODE={environ.get('SLURM_TASKS_PER_NODE', '?')}), so ranks per node "
                   "may not match GPUs per node; set --ntasks-per-node (and --nodes) instead")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        listed = [d for d in visible.split(",") if d.strip()]
        if not listed or listed[0].strip() in ("-1", "NoDevFiles"):
            out.append(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU: unset it, or list device ids")
        elif not cuda_build:
            out.append(f"CUDA_VISIBLE_DEVICES={visible} but this torch is a CPU-only build: install a CUDA build")
        elif cuda_devices < len(listed):
            out.append(f"CUDA_VISIBLE_DEVICES={visible} lists {len(listed)} devices but {cuda_devices} are "
                       "visible: an id is wrong or busy (CUDA stops at the first invalid entry)")
    if "LOCAL_RANK" in environ and "RANK" not in environ and "WORLD_SIZE" not in environ:
        out.append("LOCAL_RANK is set without RANK and WORLD_SIZE: detection ignores it and runs one process")
    return out


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def render(r: dict[str, Any]) -> str:
    def yes(value: Any) -> str:
        return "not available" if not value else "available" if value is True else f"{value}"

    build = f"CUDA {r['cuda_build']} build" if r["cuda_build"] else "CPU-only build"
    lines = [f"python     {r['python']} on {r['platform']}", f"torch      {r['torch']} ({build})",
             f"CPU        {r['cpu_cores']} cores usable, {r['torch_threads']} torch threads",
             f"malloc     {r['malloc']}",
             f"CUDA       {'available' if r['cuda_available'] else 'not available'}",
             f"cuDNN      {yes(r['cudnn'])}", f"NCCL       {yes(r['nccl'])}", f"gloo       {yes(r['gloo'])}",
             f"MPI        {yes(r['mpi'])}"]
    lines += [f"GPU {g['index']:<6} {g['name']}, {g['memory_gib']} GiB, compute {g['capability']}"
              for g in r["gpus"]] or ["GPUs       none visible"]
    launch = r["launch"]
    if launch is None:
        lines.append("launch     unresolved: fit would stop with the first warning below")
    else:
        lines += [f"launch     {launch['launcher']}",
                  f"rank       {launch['rank']} (local {launch['local_rank']}), world size "
                  f"{launch['world_size']} ({launch['local_world_size']} per node)",
                  f"master     {launch['master_addr']}:{launch['master_port']}",
                  f"backend    {launch['backend']}", f"device     {launch['device']}"]
        if launch["run_id"]:
            lines.append(f"run id     {launch['run_id']} (restart {launch['restart_count']})")
    lines += [f"warning: {w}" for w in r["warnings"]]
    if launch and launch["world_size"] > 1:  # every rank reports: keep interleaved lines apart
        lines = [f"[rank {launch['rank']}] {line}" for line in lines]
    return "\n".join(lines)
