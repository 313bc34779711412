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
