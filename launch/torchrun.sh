#!/usr/bin/env bash
# Single node with torchrun:  NPROC=2 bash launch/torchrun.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and MASTER_PORT (the same
# free port on every node) set.
set -euo pipefail
if [ "${NNODES:-1}" -gt 1 ] && { [ -z "${MASTER_PORT:-}" ] || [ -z "${MASTER_ADDR:-}" ]; }; then
    # a single node picks 127.0.0.1 and a free port itself; nodes that each picked their own would wait forever
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (node 0's address) and MASTER_PORT (a free port"          "there), the same on every node" >&2
    exit 2
fi
MULTI_NODE=$([ "${NNODES:-1}" -gt 1 ] && echo 1 || echo 0)
source "$(dirname "$0")/common.sh"
exec "$(dirname "$PY")/torchrun" --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m ds_zo.train "$@"
