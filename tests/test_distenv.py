import pytest

from ddp_train.distenv import DistEnv, first_host
from ddp_train.errors import UsageError

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc",
            "TORCHELASTIC_RESTART_COUNT": "2"}
SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
         "SLURM_RESTART_COUNT": "1"}


def test_single_process():
    env = DistEnv.from_environ({})
    assert (env.launcher, env.rank, env.world_size, env.device, env.backend) == ("single", 0, 1, "cpu", "gloo")
    assert not env.distributed and env.is_main


def test_torchrun():
    env = DistEnv.from_environ(TORCHRUN)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.local_world_size) == ("torchrun", 3, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.run_id, env.restart_count) == ("10.0.0.1", 29500, "abc", 2)


def test_torchrun_gpus_pick_local_rank_and_nccl():
    env = DistEnv.from_environ(TORCHRUN, cuda_devices=2)
    assert (env.device, env.backend) == ("cuda:1", "nccl")


def test_slurm_ranks():
    env = DistEnv.from_environ(SLURM)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.local_world_size) == ("slurm", 5, 1, 8, 4)
    assert env.master_addr == "gpu07" and env.master_port == 15000 + 4242 % 20000
    assert (env.run_id, env.restart_count, env.slurm_job_id) == ("4242", 1, "4242")


def test_slurm_master_overrides():
    env = DistEnv.from_environ({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("head", 1234)


def test_slurm_batch_step_is_single_process():
    # the batch script itself (no srun step) must not wait for ranks that will never come
    env = DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"})
    assert env.launcher == "single" and env.run_id == "7"


def test_torchrun_wins_over_slurm():
    assert DistEnv.from_environ({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_one_gpu_per_task():
    env = DistEnv.from_environ(SLURM, cuda_devices=1)
    assert env.device == "cuda:0"


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "not in range"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "must be an integer"),
])
def test_bad_combinations(env, message):
    with pytest.raises(UsageError, match=message):
        DistEnv.from_environ(env)


def test_nccl_without_cuda():
    with pytest.raises(UsageError, match="--backend nccl needs a CUDA GPU"):
        DistEnv.from_environ({}, backend="nccl")


def test_too_few_gpus():
    with pytest.raises(UsageError, match="local rank 3 has no GPU"):
        DistEnv.from_environ({**TORCHRUN, "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, cuda_devices=2)


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[03-05,9],cpu1", "gpu03"), ("a,b", "a"), ("node7", "node7"), ("n[1-2]-ib", "n1-ib"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_job_id_names_the_run_even_under_torchrun():
    # torchrun --standalone draws a fresh id each launch; a requeued job must find its run again
    env = DistEnv.from_environ({**TORCHRUN, "SLURM_JOB_ID": "4242"})
    assert env.launcher == "torchrun" and env.run_id == "4242"


# Launches without torchrun: Kubernetes pods (env://), Open MPI, MPICH/Intel MPI, LSF jsrun.
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1990197249", "PMIX_RANK": "3"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
JSRUN = {"JSM_NAMESPACE_RANK": "5", "JSM_NAMESPACE_SIZE": "12", "JSM_NAMESPACE_LOCAL_RANK": "5",
         "JSM_NAMESPACE_LOCAL_SIZE": "6", "LSB_JOBID": "77", "LSB_MCPU_HOSTS": "batch1 1 node4 42 node5 42"}
POD = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}


def test_pod_with_one_gpu_takes_cuda0():
    # a 4-pod PyTorchJob, one GPU per pod: rank 3 must not ask for cuda:3
    env = DistEnv.from_environ(POD, cuda_devices=1)
    assert (env.launcher, env.rank, env.local_rank, env.local_world_size, env.device) == ("env", 3, 0, 1, "cuda:0")
    assert (env.master_addr, env.master_port) == ("job-master-0", 23456)


def test_pod_on_cpu_holds_one_process():
    env = DistEnv.from_environ(POD)
    assert (env.local_rank, env.local_world_size, env.device) == (0, 1, "cpu")


def test_env_local_rank_from_local_world_size():
    env = DistEnv.from_environ({**POD, "LOCAL_WORLD_SIZE": "2"}, cuda_devices=2)
    assert (env.local_rank, env.local_world_size, env.device) == (1, 2, "cuda:1")


def test_env_local_rank_given():
    env = DistEnv.from_environ({**POD, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, cuda_devices=4)
    assert (env.local_rank, env.device) == (0, "cuda:0")


def test_env_loopback_master_means_one_node():
    env = DistEnv.from_environ({**POD, "MASTER_ADDR": "127.0.0.1"}, cuda_devices=4)
    assert (env.local_rank, env.local_world_size, env.device) == (3, 4, "cuda:3")


def test_env_several_gpus_and_no_local_rank_is_one_line():
    with pytest.raises(UsageError, match="cannot tell which of this node's 4 GPUs rank 3 should use: set LOCAL_RANK"):
        DistEnv.from_environ(POD, cuda_devices=4)


def test_env_bad_local_world_size():
    with pytest.raises(UsageError, match="LOCAL_WORLD_SIZE=0"):
        DistEnv.from_environ({**POD, "LOCAL_WORLD_SIZE": "0"})


def test_open_mpi():
    env = DistEnv.from_environ({**OMPI, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, cuda_devices=2)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.local_world_size) == ("mpi", 3, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.device, env.run_id) == ("head", 1234, "cuda:1", "1990197249")


def test_open_mpi_one_node_needs_no_master():
    env = DistEnv.from_environ({**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert env.master_addr == "127.0.0.1" and 15000 <= env.master_port < 35000
    again = DistEnv.from_environ({**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert again.master_port == env.master_port  # every rank derives the same port from the job id


def test_open_mpi_several_nodes_without_master_is_one_line():
    with pytest.raises(UsageError, match="Open MPI started 4 ranks on several nodes .* set MASTER_ADDR"):
        DistEnv.from_environ(OMPI)


def test_open_mpi_inside_slurm_uses_the_first_node_and_beats_slurm():
    # mpirun in an allocation: its daemons are an srun step of one task per node
    env = DistEnv.from_environ({**OMPI, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
                                "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (env.launcher, env.rank, env.world_size, env.master_addr, env.run_id) == ("mpi", 3, 4, "gpu07", "4242")


def test_mpich_and_intel_mpi():
    env = DistEnv.from_environ({**MPICH, "MASTER_PORT": "2000"})
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("mpi", 2, 2, 3)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 2000)


def test_mpich_one_node_without_port_is_one_line():
    with pytest.raises(UsageError, match="set MASTER_PORT"):
        DistEnv.from_environ(MPICH)


def test_srun_pmi2_takes_slurm_local_id():
    env = DistEnv.from_environ({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_LOCALID": "1", "SLURM_PROCID": "3",
                                "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "9"},
                               cuda_devices=2)
    assert (env.rank, env.local_rank, env.master_addr, env.device) == (3, 1, "n1", "cuda:1")


def test_lsf_jsrun():
    env = DistEnv.from_environ(JSRUN, cuda_devices=6)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.local_world_size) == ("lsf", 5, 5, 12, 6)
    assert (env.master_addr, env.run_id, env.device) == ("node4", "77", "cuda:5")


def test_mpi_rank_out_of_range():
    with pytest.raises(UsageError, match="OMPI_COMM_WORLD_RANK=4 is not in range"):
        DistEnv.from_environ({**OMPI, "OMPI_COMM_WORLD_RANK": "4"})


def test_pmix_without_world_size_is_one_line():
    with pytest.raises(UsageError, match="PMIX_RANK is set but nothing gives the world size"):
        DistEnv.from_environ({"PMIX_RANK": "1"})
