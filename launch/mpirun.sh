#!/usr/bin/env bash
# Open MPI (ranks discovered through mpi4py; one node ⇒ loopback):
#   NPROC=2 bash launch/mpirun.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json
# Multi-node: add a hostfile, e.g. MPI_ARGS="--hostfile hosts" with MASTER_ADDR unset (rank 0's address is used).
set -euo pipefail
source "$(dirname "$0")/common.sh"
unset MASTER_ADDR
exec mpirun --allow-run-as-root --oversubscribe -np "$NPROC" ${MPI_ARGS:-} \
    -x DS_ACCELERATOR -x GLOO_SOCKET_IFNAME -x OMP_NUM_THREADS -x MASTER_PORT "$PY" -m ds_zo.train "$@"
