#!/usr/bin/env bash
# Single node, NPROC ranks (default 2) with DeepSpeed's launcher:
#   NPROC=2 bash launch/deepspeed.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json --steps 100
# (on CPU, --num_gpus sets the number of ranks; without it DeepSpeed starts one)
set -euo pipefail
source "$(dirname "$0")/common.sh"
# DeepSpeed's runner passes SIGTERM/SIGINT on to its ranks only on several nodes: on one, a `kill` of the runner (by
# `timeout`, a supervisor, a job scheduler) ended it and left the ranks training, orphaned. So the runner gets a
# process group of its own (setsid: a background job of a script is not a group leader, so it does not fork) and
# this script passes those signals on to the whole group, then waits for it to end.
setsid "$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module ds_zo.train "$@" &
group=$!
for signal in TERM INT HUP; do
    trap "kill -$signal -- -$group 2>/dev/null || true" "$signal"
done
set +e
wait "$group"
status=$?
while kill -0 "$group" 2>/dev/null; do     # a trapped signal ends `wait` early: wait for the group's end
    wait "$group"
    status=$?
done
exit "$status"
