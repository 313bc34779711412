# Sourced by the launch scripts: sets the array `torchrun` to $TORCHRUN if set, else to the first
# of ddp-torchrun (torchrun with a quick exit: ddp_train/torchrun.py) or torchrun on PATH (an active
# venv), else this checkout's own .venv (which `make fit` creates), so the scripts work without
# activating anything; exits 2 with one line when there is none.
venv=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)/.venv
if [[ -n ${TORCHRUN:-} ]]; then
    read -ra torchrun <<<"$TORCHRUN"  # a word list, e.g. "python -m torch.distributed.run"
elif command -v ddp-torchrun >/dev/null; then
    torchrun=(ddp-torchrun)
elif command -v torchrun >/dev/null; then
    torchrun=(torchrun)
elif [[ -x $venv/bin/ddp-torchrun ]]; then
    torchrun=("$venv/bin/ddp-torchrun")
elif [[ -x $venv/bin/torchrun ]]; then
    torchrun=("$venv/bin/torchrun")
else
    echo "$(basename "$0"): torchrun not found on PATH or in $venv/bin: run \`make fit\` once (it creates .venv), or activate a venv with ddp-train installed" >&2
    exit 2
fi
