"""The stop vote (ddp_train/stopvote.py): the same decision at the same step on every rank, within
its bound, whatever interval each rank proposes."""

import json
import subprocess
import textwrap

import pytest

from conftest import BIN, ROOT, base_env

# (every_s of rank 0, of rank 1, max_every, asking rank, step at which it asks). The workers' clock
# advances one "second" per step, so a rank proposes min(max_every, every_s) steps between votes.
SCENARIOS = [
    (0, 0, 64, 0, 2), (0, 0, 64, 1, 2),  # a vote every step: decided at the next one
    (3, 5, 64, 1, 4), (5, 3, 64, 0, 9),  # different proposals: both ranks take the smaller
    (100, 100, 4, 0, 5), (100, 100, 4, 1, 15),  # capped by max_every
    (100, 100, 4, 1, 8),  # asked just before an end() (an epoch's end)
]
STEPS = 30

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from ddp_train.stopvote import StopVote

    out, scenarios, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")
    results = []
    for every0, every1, max_every, asker, ask_at in scenarios:
        clock = [0.0]
        votes = StopVote(control, every_s=(every0, every1)[rank], max_every=max_every, clock=lambda: clock[0])
        decided = []
        for step in range(1, steps + 1):
            clock[0] += 1.0
            if votes.vote(rank == asker and step == ask_at):
                decided.append(step)
            if step == 8:
                votes.end()  # an epoch's end: the next votes go on
        votes.end()
        results.append(decided)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[list[int]]]:
    """One torchrun launch runs every scenario; per rank, the steps decided in each scenario."""
    tmp = tmp_path_factory.mktemp("stopvote")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp), json.dumps(SCENARIOS), str(STEPS)],
                          capture_output=True, text=True, env=base_env(), cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(SCENARIOS)), ids=["-".join(map(str, s)) for s in SCENARIOS])
def test_every_rank_stops_at_the_same_step_within_two_intervals(ranks, i):
    every0, every1, max_every, _, ask_at = SCENARIOS[i]
    interval = max(1, min(every0, every1, max_every))
    decided = ranks[0][i]
    assert decided == ranks[1][i], (SCENARIOS[i], ranks[0][i], ranks[1][i])
    assert len(decided) == 1 and ask_at < decided[0] <= ask_at + 2 * interval, (SCENARIOS[i], decided)
    if interval == 1:
        assert decided == [ask_at + 1]
