#!/usr/bin/env bash
# Single node with torchrun:  NPROC=2 bash launch/torchrun.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json
# Multi-node: run on every node with NNODES, NODE_RANK and MASTER_ADDR (node 0's address) set.
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec "$(dirname "$PY")/torchrun" --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m ds_zo.train "$@"
