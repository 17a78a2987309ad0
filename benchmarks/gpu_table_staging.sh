#!/usr/bin/env bash
# The fused launches' table staging on a GPU, in about 4 minutes (nineteenth session; device tool: timeout_s 420,
# carry .whl). The first GPU check of the fused kernels (gpu_h200_2026-11-27f) found OPT-1.3B's offloaded step at
# batch 1 waiting 11.6 ms for uploads against 0.2 ms with the unfused passes. This times:
#  - benchmarks.table_staging: one table staged by the copy engines or by the fetch kernel, alone and behind an
#    upload on another stream;
#  - the fused kernels' CUDA tests (now fetching their tables) and the engine-against-MeZO-loop test;
#  - OPT-1.3B (bf16, seq 2048, batch 1 and 4): resident and offload at prefetch depths 1 and 2, each beside the
#    copied tables (*_table_copy), interleaved; the parameters must come out identical.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
echo "--- table staging"
timeout -k 5 60 python3 -m benchmarks.table_staging --out "$OUTDIR/table_staging.json" 2>&1 | grep -v '^\['
echo "--- CUDA tests"
timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider -m "not multiprocess" tests/test_fused_triton.py \
    "tests/test_cuda.py::test_engine_matches_the_plain_mezo_loop_on_either_sampler" 2>&1 \
    | tee "$OUTDIR/cuda_tests.log" | tail -6
echo "--- OPT-1.3B"
timeout -k 10 200 python3 -m benchmarks.offload_bench --shape opt-1.3b --dtype bf16 --seq 2048 --batch 1,4 \
    --span-chunks 8 --steps 2 --reps 5 --prefetch 1,2 --no-profile \
    --modes resident,offload,resident_table_copy,offload_table_copy --out "$OUTDIR/opt-1.3b.json" 2>&1 \
    | grep -v '^\[' | tee "$OUTDIR/opt-1.3b.log" | grep -E "_median|_over_|stall|identical|during_transfer_GBps"
python3 -m benchmarks.gpu_summary "$OUTDIR" 2>&1 | grep -v '^\['
