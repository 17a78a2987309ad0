#!/usr/bin/env bash
# Single node with torchrun:  NPROC=2 bash launch/torchrun.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and MASTER_PORT (the same
# free port on every node) set.
set -euo pipefail
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_PORT:-}" ]; then
    # a single node picks a free port itself; nodes that each picked their own would wait for each other forever
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_PORT, the same on every node (a free port on node 0)" >&2
    exit 2
fi
source "$(dirname "$0")/common.sh"
exec "$(dirname "$PY")/torchrun" --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m ds_zo.train "$@"
