#!/usr/bin/env bash
# Single node, NPROC ranks (default 2) with DeepSpeed's launcher:
#   NPROC=2 bash launch/deepspeed.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json --steps 100
# (on CPU, --num_gpus sets the number of ranks; without it DeepSpeed starts one)
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec "$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module ds_zo.train "$@"
