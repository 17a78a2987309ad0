#!/usr/bin/env bash
# Single node, NPROC ranks (default 2) with DeepSpeed's launcher:
#   NPROC=2 bash launch/deepspeed.sh --deepspeed_config configs/zo_sgd_tiny_pertp2.json --steps 100
# (on CPU, --num_gpus sets the number of ranks; without it DeepSpeed starts one)
set -euo pipefail
source "$(dirname "$0")/common.sh"

# DeepSpeed's runner passes SIGTERM/SIGINT on to its ranks only on several nodes: on one, a SIGTERM to this script
# alone (`kill PID` by a supervisor) ended the runner and left the ranks training. So this script passes SIGTERM and
# SIGHUP on to every process below the runner. They stay in the caller's process group, so a signal to the whole
# group (Ctrl-C, `timeout`, its SIGKILL escalation) still reaches each of them directly, as before.
below() {   # the processes below pid $1, from /proc (Linux; elsewhere none are found and only the runner is signalled)
    local stat line pid fields p
    local -A parent=()
    for stat in /proc/[0-9]*/stat; do
        read -r line < "$stat" 2>/dev/null || continue
        pid=${line%% *}
        read -r -a fields <<< "${line##*) }"      # after the command name, which may hold spaces: state, ppid, ...
        parent[$pid]=${fields[1]}
    done
    local frontier=("$1") next
    while [ ${#frontier[@]} -gt 0 ]; do
        next=()
        for pid in "${!parent[@]}"; do
            for p in "${frontier[@]}"; do
                if [ "${parent[$pid]}" = "$p" ]; then next+=("$pid"); fi
            done
        done
        echo "${next[@]}"
        frontier=("${next[@]}")
    done
}
forward() {   # the whole tree is listed before any of it is signalled: a killed runner's children lose their parent
    local tree
    tree=$(below "$runner")
    kill -"$1" "$runner" $tree 2>/dev/null || true
}
runner=
# (not SIGINT: Ctrl-C reaches the whole group at once, and the ranks would get it twice)
trap '[ -n "$runner" ] && forward TERM' TERM
trap '[ -n "$runner" ] && forward HUP' HUP
# <&0: a background command of a script reads /dev/null otherwise (pdb or a prompt in a rank needs the terminal)
"$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module ds_zo.train "$@" <&0 &
runner=$!
set +e
wait "$runner"
status=$?
while kill -0 "$runner" 2>/dev/null; do     # a trapped signal ends `wait` early: wait for the runner's end
    wait "$runner"
    status=$?
done
exit "$status"
