"""`DistEnv`: who this process is in the job, derived once from the environment.

Pure and torch-free so the CLI can ask "am I rank 0?" before importing torch, and tests can feed
it plain dicts. It is the only place that interprets launcher variables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # torchrun | env | slurm | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str  # nccl | gloo
    device: str  # cuda:N | cpu
    run_id: str | None  # stable across restarts and requeues of one launch
    restart_count: int
    cuda_devices: int
    slurm_job_id: str | None = None
    agent_store: bool = False  # torchrun's agent hosts the store at master_addr:master_port

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, env: Mapping[str, str], cuda_devices: int = 0,
                     backend: str = "auto") -> "DistEnv":
        if "RANK" in env or "WORLD_SIZE" in env:
            launcher, fields = _torchrun(env)
        elif "SLURM_PROCID" in env and _int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
            launcher, fields = "slurm", _slurm(env)
        else:
            launcher, fields = "single", dict(rank=0, local_rank=0, world_size=1, local_world_size=1,
                                              master_addr="127.0.0.1", master_port=0)
        device = _device(fields["local_rank"], fields["local_world_size"], cuda_devices,
                         shared=launcher == "torchrun" and backend != "gloo")
        if backend == "auto":
            backend = "nccl" if device.startswith("cuda") else "gloo"
        elif backend == "nccl" and not device.startswith("cuda"):
            raise UsageError("--backend nccl needs a CUDA GPU and none is visible; use --backend gloo "
                             "(or auto) on CPU")
        # The Slurm job id survives a requeue; torchrun --standalone draws a new id every launch.
        run_id = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID") or None
        if run_id == "none":
            run_id = None
        restarts = max(_int(env, "TORCHELASTIC_RESTART_COUNT", 0), _int(env, "SLURM_RESTART_COUNT", 0))
        return cls(launcher=launcher, backend=backend, device=device, run_id=run_id,
                   restart_count=restarts, cuda_devices=cuda_devices,
                   slurm_job_id=env.get("SLURM_JOB_ID") or None,
                   agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True", **fields)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {key} must be an integer (got {value!r})") from None


def _torchrun(env: Mapping[str, str]) -> tuple[str, dict]:
    for key in ("RANK", "WORLD_SIZE"):
        if key not in env:
            other = "WORLD_SIZE" if key == "RANK" else "RANK"
            raise UsageError(f"{other} is set but {key} is not: launch with torchrun, or set RANK, "
                             "WORLD_SIZE, MASTER_ADDR and MASTER_PORT together")
    rank, world = _int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in range for WORLD_SIZE={world}")
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise UsageError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun, "
                         "or set both to rank 0's address and a free port")
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    return launcher, dict(rank=rank, local_rank=_int(env, "LOCAL_RANK", rank), world_size=world,
                          local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=_int(env, "MASTER_PORT", 0))


def _slurm(env: Mapping[str, str]) -> dict:
    world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job_id = _int(env, "SLURM_JOB_ID", 0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    return dict(rank=_int(env, "SLURM_PROCID", 0), local_rank=_int(env, "SLURM_LOCALID", 0),
                world_size=world, local_world_size=int(re.match(r"\d+", per_node).group()),
                master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                master_port=_int(env, "MASTER_PORT", 0) or 15000 + job_id % 20000)


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if not match:
        raise UsageError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges:
        prefix += ranges.split(",")[0].split("-")[0]
    return prefix + suffix


def _device(local_rank: int, local_world_size: int, cuda_devices: int, shared: bool = False) -> str:
    """`shared`: every local process sees the same GPUs (torchrun gives its workers one environment)
    and the backend needs one GPU per process (NCCL refuses two ranks on one: "Duplicate GPU")."""
    if cuda_devices == 0:
        return "cpu"
    if cuda_devices == 1 and local_world_size > 1:
        if shared:
            raise UsageError(f"local rank {local_rank} has no GPU of its own: {local_world_size} processes on this "
                             "node share its one visible GPU, and NCCL needs one GPU per process; start one "
                             "process per GPU (torchrun --nproc_per_node=1), or pass --backend gloo to share it")
        return "cuda:0"  # the scheduler gave each process its own GPU (e.g. srun --gpus-per-task=1)
    if local_rank >= cuda_devices:
        raise UsageError(f"local rank {local_rank} has no GPU: {cuda_devices} visible on this node; "
                         f"start at most {cuda_devices} processes per node")
    return f"cuda:{local_rank}"


def rank_of(env: Mapping[str, str]) -> int:
    """This process's rank for deciding who prints an error; 0 when the environment is unreadable."""
    try:
        return DistEnv.from_environ(env).rank
    except UsageError:
        return 0
