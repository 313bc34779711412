#!/usr/bin/env bash
# Train on this machine with one process per GPU: a thin wrapper over `torchrun --standalone`.
#
#   launch/local.sh                          # every visible GPU; 2 processes on a CPU-only machine
#   launch/local.sh --epochs 3 --lr 3e-4     # arguments go to `ddp-train fit`
#   NPROC=4 launch/local.sh --data synthetic # 4 processes, GPUs or not
#
# Variables:
#   NPROC     processes (default: the GPUs in CUDA_VISIBLE_DEVICES if it is set, else those
#             `nvidia-smi -L` lists; 2 when there is none, so a CPU run still exercises DDP)
#   TORCHRUN  how to run torchrun (default: ddp-torchrun, else torchrun, from PATH, else
#             from this checkout's .venv/bin; e.g. "python -m torch.distributed.run")
# ddp_train picks the backend itself: nccl on GPUs, gloo on CPU.
set -euo pipefail

if [[ -z ${NPROC:-} ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # nvidia-smi ignores it, so count it first
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        NPROC=${#ids[@]}
    elif command -v nvidia-smi >/dev/null; then
        NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    ((${NPROC:-0} > 0)) || NPROC=2
fi

# shellcheck source=launch/torchrun.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/torchrun.sh"

exec "${torchrun[@]}" --standalone --nproc-per-node "$NPROC" -m ddp_train fit "$@"
