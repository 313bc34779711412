"""The stop vote (ddp_train/stopvote.py): same decision, same step, on every rank; the DDP hook
that carries it leaves the gradients as DDP's own all-reduce makes them."""

import json
import subprocess
import textwrap

import pytest

from conftest import BIN, ROOT, base_env

# (mode, asking rank, step at which it asks): "control" carries the vote on the control group,
# "hook" in DDP's gradient all-reduce, "mixed" too but steps 3-5 have no synchronising backward.
SCENARIOS = [
    ("hook", 0, 2), ("hook", 1, 2), ("control", 0, 2), ("control", 1, 2),
    ("mixed", 1, 4),  # asked in a step without a gradient all-reduce
    ("mixed", 0, 5),  # ... in the last such step: decided in the next, hooked, one
    ("hook", 1, 8), ("control", 1, 8),  # asked just before an end() (an epoch's end)
]

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
    from ddp_train.stopvote import StopVote

    out, scenarios = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 3))

    results = []
    for mode, asker, ask_at in scenarios:
        # Small buckets (bucket_cap_mb): the flag shares the gradient all-reduce with other buckets.
        plain = nn.parallel.DistributedDataParallel(model(), bucket_cap_mb=0.2)
        hooked = nn.parallel.DistributedDataParallel(model(), bucket_cap_mb=0.2)
        votes = StopVote(control)
        if mode != "control":
            votes.attach(hooked)
        g = torch.Generator().manual_seed(rank)
        decided = []
        for step in range(1, 13):
            x, y = torch.randn(16, 8, generator=g), torch.randint(3, (16,), generator=g)
            if not (mode == "mixed" and 3 <= step <= 5):
                for net in (plain, hooked):
                    F.cross_entropy(net(x), y).backward()
            if votes.vote(rank == asker and step == ask_at):
                decided.append(step)
            if step == 8:
                votes.end()  # an epoch's end: the next votes go on
        votes.end()
        pairs = list(zip(plain.parameters(), hooked.parameters()))
        results.append({"decided": decided, "grads_equal": all(torch.equal(a.grad, b.grad) for a, b in pairs),
                        "buckets": len(hooked.reducer._get_zeros_like_grad_buckets())})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[dict]]:
    """One torchrun launch runs every scenario; per rank, one result per scenario."""
    tmp = tmp_path_factory.mktemp("stopvote")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp), json.dumps(SCENARIOS)],
                          capture_output=True, text=True, env=base_env(), cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(SCENARIOS)), ids=["-".join(map(str, s)) for s in SCENARIOS])
def test_every_rank_stops_at_the_next_step(ranks, i):
    ask_at = SCENARIOS[i][2]
    assert ranks[0][i]["decided"] == ranks[1][i]["decided"] == [ask_at + 1], (SCENARIOS[i], ranks[0][i], ranks[1][i])


@pytest.mark.slow
def test_hook_keeps_ddp_gradients(ranks):
    """Bit for bit: the hook divides, then all-reduces, as DDP's own all-reduce does."""
    for rank in ranks:
        for scenario, r in zip(SCENARIOS, rank):
            if scenario[0] == "hook":
                assert r["buckets"] >= 2 and r["grads_equal"], (scenario, r)
