#!/usr/bin/env bash
# Open MPI (ranks discovered through mpi4py; one node ⇒ loopback):
#   NPROC=2 bash launch/mpirun.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json
# Multi-node: add a hostfile, e.g. MPI_ARGS="--hostfile hosts" with MASTER_ADDR unset (rank 0's address is used);
# MPI_ARGS naming hosts (--hostfile, --host, -H) makes it a multi-node launch (gloo then does not use loopback).
set -euo pipefail
MULTI_NODE=0
case " ${MPI_ARGS:-} " in
    *" --hostfile"* | *" -hostfile"* | *" --host"* | *" -host"* | *" -H"* | *" --machinefile"* | *" -machinefile"*)
        MULTI_NODE=1 ;;
esac
source "$(dirname "$0")/common.sh"
unset MASTER_ADDR
EXPORTS=(-x MASTER_PORT)
for name in DS_ACCELERATOR GLOO_SOCKET_IFNAME OMP_NUM_THREADS; do
    if [ -n "${!name:-}" ]; then EXPORTS+=(-x "$name"); fi
done
exec mpirun --allow-run-as-root --oversubscribe -np "$NPROC" ${MPI_ARGS:-} \
    "${EXPORTS[@]}" "$PY" -m ds_zo.train "$@"
