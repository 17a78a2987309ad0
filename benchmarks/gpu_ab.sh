#!/usr/bin/env bash
# A/B of two source trees on one GPU machine: this tree against another (e.g. the previous commit, unpacked with
# `git archive REV ds_zo benchmarks | tar -x -C .old` and carried with .whl), the same offload_bench runs one after
# the other on the same machine, then this tree's tests/test_cuda.py. On the device machine, from the repo root:
#     bash benchmarks/gpu_ab.sh .old
set -uo pipefail
cd "$(dirname "$0")/.."
OTHER=${1:?usage: gpu_ab.sh OTHER_TREE}
source benchmarks/gpu_env.sh
BASE_PATH=${PYTHONPATH:-}
timeout 90 env PYTHONPATH=$PWD:$BASE_PATH python3 -m pytest -q -p no:cacheprovider -m "not multiprocess" \
    tests/test_cuda.py 2>&1 | tee "$OUTDIR/cuda_tests.log" | tail -4
for spec in "opt-1.3b 2 80" "opt-6.7b 1 110"; do
    set -- $spec
    for tree in "$PWD" "$OTHER"; do
        name=$([ "$tree" = "$PWD" ] && echo new || echo old)
        (cd "$tree" && timeout "$3" env PYTHONPATH=$PWD:$BASE_PATH python3 -m benchmarks.offload_bench --shape "$1" \
            --dtype bf16 --seq 2048 --batch 1,4 --span-chunks 8 --steps "$2" --reps 3 --out "$OUTDIR/$name-$1.json" \
            2>&1 | grep -E "step_s_median|peak_gpu_GB|params_identical|kernel_fraction|during_transfer_over" \
            | sed "s/^/$name $1 /")
    done
done
