"""`DistEnv`: who this process is in the job, derived once from the environment.

Pure and torch-free so the CLI can ask "am I rank 0?" before importing torch, and tests can feed
it plain dicts. It is the only place that interprets launcher variables.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Mapping

from .errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # torchrun | env | slurm | mpi | lsf | single
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

    def oversubscribed(self, cores: int) -> str | None:
        """A warning when this machine runs more CPU training processes than it has cores."""
        if self.device != "cpu" or self.local_world_size <= cores:
            return None
        return (f"{self.local_world_size} processes on {cores} CPU cores: they take turns on the cores, so this "
                f"runs slower than {cores} would; start at most {cores} per machine (--nproc_per_node={cores})")

    @classmethod
    def from_environ(cls, env: Mapping[str, str], cuda_devices: int = 0,
                     backend: str = "auto") -> "DistEnv":
        mpi = _mpi_family(env)
        if "RANK" in env or "WORLD_SIZE" in env:
            launcher, fields = _torchrun(env, cuda_devices)
        elif mpi is not None:  # before Slurm: mpirun in an allocation starts its daemons with srun
            launcher, fields = mpi[0], _mpi(env, mpi, cuda_devices)
        elif "SLURM_PROCID" in env and _int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
            launcher, fields = "slurm", _slurm(env)
        elif "PMIX_RANK" in env:
            raise UsageError("PMIX_RANK is set but nothing gives the world size: launch with mpirun or srun, "
                             "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
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
        run_id = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID") or _job_id(env) or None
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


def _torchrun(env: Mapping[str, str], cuda_devices: int) -> tuple[str, dict]:
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
    master = env.get("MASTER_ADDR", "127.0.0.1")
    if "LOCAL_RANK" in env:
        local = _int(env, "LOCAL_RANK", 0), _int(env, "LOCAL_WORLD_SIZE", world)
    elif "LOCAL_WORLD_SIZE" in env:  # ranks are placed node by node, as torchrun and Kubeflow do
        per_node = _int(env, "LOCAL_WORLD_SIZE", 1)
        if per_node < 1:
            raise UsageError(f"LOCAL_WORLD_SIZE={per_node} must be at least 1")
        local = rank % per_node, per_node
    else:
        local = _unknown_local(rank, world, master, cuda_devices, "set LOCAL_RANK (or LOCAL_WORLD_SIZE)")
    return launcher, dict(rank=rank, local_rank=local[0], world_size=world, local_world_size=local[1],
                          master_addr=master, master_port=_int(env, "MASTER_PORT", 0))


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (no name lookup: pure)."""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _unknown_local(rank: int, world: int, master: str, cuda_devices: int, fix: str) -> tuple[int, int]:
    """(local rank, processes on this node) when the launcher does not say: every rank is on this
    node when the master is loopback; else this node holds one process, which only matters (and
    is only safe to assume) when the node has at most one GPU."""
    if world == 1 or is_loopback(master):
        return rank, world
    if cuda_devices <= 1:
        return 0, 1
    raise UsageError(f"cannot tell which of this node's {cuda_devices} GPUs rank {rank} should use: {fix} "
                     "for each process, or launch with torchrun")


# MPI and LSF launchers: (launcher, family, rank, world size, local rank, processes on the node).
_MPI_FAMILIES = (
    ("mpi", "Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("lsf", "LSF jsrun", "JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_LOCAL_RANK",
     "JSM_NAMESPACE_LOCAL_SIZE"),
    ("mpi", "MPICH/Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def _mpi_family(env: Mapping[str, str]) -> tuple[str, ...] | None:
    return next((f for f in _MPI_FAMILIES if f[3] in env), None)


def _mpi(env: Mapping[str, str], family: tuple[str, ...], cuda_devices: int) -> dict:
    launcher, name, rank_key, size_key, local_key, local_size_key = family
    world = _int(env, size_key, 1)
    rank = _int(env, rank_key, _int(env, "PMIX_RANK", 0))
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"{rank_key}={rank} is not in range for {size_key}={world}")
    if local_key in env:
        local = _int(env, local_key, 0), _int(env, local_size_key, 1)
    elif "SLURM_LOCALID" in env:  # srun --mpi=pmi2
        local = _int(env, "SLURM_LOCALID", 0), _int(env, local_size_key, 1)
    else:
        local = _unknown_local(rank, world, env.get("MASTER_ADDR", ""), cuda_devices,
                               f"set {local_key} (or LOCAL_RANK)")
    single_node = local[1] >= world
    master = env.get("MASTER_ADDR") or ("127.0.0.1" if single_node else _first_compute_host(env))
    if not master:
        raise UsageError(f"{name} started {world} ranks on several nodes and nothing names rank 0's host: "
                         "set MASTER_ADDR to it and MASTER_PORT to a free port, e.g. mpirun -x "
                         "MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...")
    port = _int(env, "MASTER_PORT", 0)
    if not port:
        job = _job_id(env) or env.get("SLURM_JOB_ID")
        if not job:
            raise UsageError(f"{name}: nothing names this job, so its rendezvous port cannot be derived: "
                             "set MASTER_PORT to a free port on rank 0's host")
        port = 15000 + zlib.crc32(job.encode()) % 20000
    return dict(rank=rank, local_rank=local[0], world_size=world, local_world_size=local[1],
                master_addr=master, master_port=port)


def _first_compute_host(env: Mapping[str, str]) -> str | None:
    """Where rank 0 runs when the scheduler placed the ranks: LSF's first compute host (the first
    entry of LSB_MCPU_HOSTS is the launch node, which runs no rank under jsrun), else Slurm's
    first node (mpirun maps ranks onto the allocation's nodes in order)."""
    lsf = env.get("LSB_MCPU_HOSTS", "").split()[::2]
    if lsf:
        return lsf[1] if len(lsf) > 1 else lsf[0]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    return first_host(nodelist) if nodelist else None


def _job_id(env: Mapping[str, str]) -> str | None:
    """The MPI or LSF launch's id, the same on every rank of one launch."""
    return env.get("LSB_JOBID") or env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE") or None


def _slurm(env: Mapping[str, str]) -> dict:
    world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job_id = _int(env, "SLURM_JOB_ID", 0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    leading = re.match(r"\d+", per_node)  # "4(x2)": 4 tasks on each of 2 nodes
    if leading is None:
        raise UsageError(f"environment variable SLURM_TASKS_PER_NODE must start with a number (got {per_node!r})")
    return dict(rank=_int(env, "SLURM_PROCID", 0), local_rank=_int(env, "SLURM_LOCALID", 0),
                world_size=world, local_world_size=int(leading.group()),
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
