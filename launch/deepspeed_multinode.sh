#!/usr/bin/env bash
# Several nodes with DeepSpeed's launcher over Open MPI and a hostfile (see launch/hostfile.example):
#   HOSTFILE=launch/hostfile MASTER_ADDR=<node0 address> bash launch/deepspeed_multinode.sh \
#       --deepspeed_config configs/full_parameter_gpu_zero3.json
# With ZeRO-3 reslicing the partition group is one node (LOCAL_WORLD_SIZE) by default, replicated across nodes;
# zero_order.partition_group_size overrides it.
# Without HOSTFILE it runs launch/hostfile.example (this node only, over loopback).
set -euo pipefail
if [ -n "${HOSTFILE:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
    # 127.0.0.1, the one-node default, is not node 0 for the other nodes: they would wait for it forever
    echo "launch/deepspeed_multinode.sh: HOSTFILE=$HOSTFILE needs MASTER_ADDR (node 0's address, which every node" \
         "reaches)" >&2
    exit 2
fi
MULTI_NODE=$([ -n "${HOSTFILE:-}" ] && echo 1 || echo 0)
source "$(dirname "$0")/common.sh"
exec "$(dirname "$PY")/deepspeed" --hostfile "${HOSTFILE:-$ROOT/launch/hostfile.example}" --launcher openmpi --force_multi \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module ds_zo.train "$@"
