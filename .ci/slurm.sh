#!/usr/bin/env bash
# Bring up the Slurm cluster that tests/test_slurm.py runs on: two simulated nodes (n1, n2) on
# this host, 2 fake GPUs each. .ci/run calls this before pytest; with CI=true the Slurm tests
# then fail, rather than skip, if the cluster is not up. Idempotent, a few seconds once installed.
set -euo pipefail
exec bash "$(dirname "$0")/../ci/slurm-cluster.sh" start 2
