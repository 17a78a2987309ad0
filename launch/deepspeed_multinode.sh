#!/usr/bin/env bash
# Several nodes with DeepSpeed's launcher over Open MPI and a hostfile (see launch/hostfile.example):
#   HOSTFILE=launch/hostfile MASTER_ADDR=<node0 address> bash launch/deepspeed_multinode.sh \
#       --deepspeed_config configs/full_parameter_gpu_zero3.json
# With ZeRO-3 reslicing the partition group is one node (LOCAL_WORLD_SIZE) by default, replicated across nodes;
# zero_order.partition_group_size overrides it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec "$(dirname "$PY")/deepspeed" --hostfile "${HOSTFILE:-$ROOT/launch/hostfile.example}" --launcher openmpi --force_multi \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module ds_zo.train "$@"
