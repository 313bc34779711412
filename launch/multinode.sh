#!/usr/bin/env bash
# Train on several machines: run this same command on every node. A thin wrapper over torchrun.
# Under Slurm use slurm/multi-node.sbatch instead; it fills these in from the job.
#
# Rendezvous (recommended): nodes may start in any order; torchrun assigns the ranks.
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=exp42 launch/multinode.sh --epochs 3
# Fixed node ranks: node 0 hosts the store; start every node with its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh --epochs 3    # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multinode.sh --epochs 3    # on node1
# Arguments go to `ddp-train fit`. Use the same arguments and a shared --run-dir on every node.
#
# Variables:
#   NNODES          number of nodes (required)
#   NPROC_PER_NODE  processes per node (default "gpu": one per visible GPU; set a number on CPU nodes)
#   RDZV_ENDPOINT   host:port on one of the nodes where the agents meet (rendezvous mode)
#   RDZV_ID         the run's id: the same on every node, new for every run; it also names the
#                   default run directory (rendezvous mode)
#   NODE_RANK       this node's rank, 0 .. NNODES-1; setting it selects fixed-rank mode
#   MASTER_ADDR     node 0's address, reachable from every node (fixed-rank mode)
#   MASTER_PORT     a free port on node 0 (fixed-rank mode; default 29500)
#   TORCHRUN        how to run torchrun (default: ddp-torchrun, else torchrun, from PATH, else
#                   from this checkout's .venv/bin; e.g. "python -m torch.distributed.run")
set -euo pipefail

: "${NNODES:?set NNODES to the number of nodes}"
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}

if [[ -n ${NODE_RANK:-} ]]; then
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 (NODE_RANK=0)}"
    rendezvous=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (one node, the same on all), or NODE_RANK and MASTER_ADDR}"
    : "${RDZV_ID:?set RDZV_ID to one id for this run, the same on every node}"
    rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
fi

# shellcheck source=launch/torchrun.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/torchrun.sh"

exec "${torchrun[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rendezvous[@]}" \
    -m ddp_train fit "$@"
