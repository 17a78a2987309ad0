#!/usr/bin/env bash
# The GPU check (≤ 8 minutes on one H100/H200). Prepare here with benchmarks/fetch_gpu_wheels.sh, then run on the
# device machine from the repository root, carrying .whl:  bash benchmarks/gpu_check.sh
# Prints: the CUDA test results; pinned H2D/D2H GB/s (memcpy baseline); ZO step time offload vs all-resident,
# the H2D rate during uploads (timing events) against the baseline, each mode's peak GPU memory and
# offload-vs-resident exactness for OPT-1.3B and OPT-6.7B shapes in bf16 at seq 2048.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install the carried wheels (.whl/)"; exit 2; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
timeout 150 python3 -m benchmarks.offload_bench --shape opt-1.3b --dtype bf16 --seq 2048 --batch 1 --steps 2 --reps 3 \
    --out "$OUTDIR/opt-1.3b.json" 2>&1 | grep -v '^\['
timeout 200 python3 -m benchmarks.offload_bench --shape opt-6.7b --dtype bf16 --seq 2048 --batch 1 --steps 1 --reps 2 \
    --out "$OUTDIR/opt-6.7b.json" 2>&1 | grep -v '^\['
