#!/usr/bin/env bash
# The GPU check (about 5 minutes on one H100/H200). Prepare here with benchmarks/fetch_gpu_wheels.sh, then run on
# the device machine from the repository root, carrying .whl:  bash benchmarks/gpu_check.sh
# Writes its logs and JSON to $OUT (default /tmp/gpu_check) and prints:
#  - tests/test_cuda.py (CUDA code paths, and the fine-tuning job with ZeRO-3 offload on the GPU);
#  - for OPT-1.3B and OPT-6.7B shapes in bf16 at seq 2048, batch 1 and 4: pinned H2D/D2H memcpy GB/s, ZO step time
#    offload vs all-resident (every repetition's time kept: the host's speed drifts), each mode's peak GPU memory
#    (batch 1, the setting of ZO2's published figures), offload-vs-resident exactness; per batch, one diagnosed step:
#    the H2D rate during the uploads against memcpy, the seconds compute waited for uploads, the host seconds in
#    the pipeline's begin/enter/exit; the GPU's kernel-busy fraction of a step and each mode's host ops (profiler);
#    for OPT-1.3B a third engine, offload with zero_order.row_blocks "off" (whole copies of the embedding and
#    output layer instead of the default's row blocks: its peak memory and step time, its parameters against the
#    default path's),
#    and ds_zo.perfmodel calibrated on this GPU against the steps: device rates timed queued (the kernels' own
#    time), host costs fitted per mode to ZO steps of two small shapes sampled between the repetitions, the
#    micro-measured host costs beside them;
#  - SmolLM2-135M's peak GPU memory (bf16, 4 x 64 tokens): inference with and without HF's loss, ds_zo all-resident
#    (embedding and output layer from row blocks, the default, and from whole copies: zero_order.row_blocks "off";
#    the default with the span of 8 chunks that the model's layers now cap at 4: dszo_span8)
#    and with offload, MeZO's loop (one fresh process each); and its ZO step with zero_order.row_blocks "off" beside
#    the default (all-resident, interleaved: step times, each engine's peak, host ops, GPU busy fraction);
#  - at the end, benchmarks/gpu_summary.py: the figures issue #6 needs, in a few lines.
# offload_bench --prefetch 1,2 adds an offload engine per depth; --trace DIR writes each mode's chrome trace.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not multiprocess" tests/test_cuda.py 2>&1 \
    | tee "$OUTDIR/cuda_tests.log" | tail -8
for spec in "opt-1.3b 2 180 resident,offload,offload_whole_copies" "opt-6.7b 1 230 resident,offload"; do
    set -- $spec
    timeout "$3" python3 -m benchmarks.offload_bench --shape "$1" --dtype bf16 --seq 2048 --batch 1,4 \
        --span-chunks 8 --steps "$2" --reps 5 --modes "$4" --calibrate --out "$OUTDIR/$1.json" 2>&1 \
        | grep -v '^\[' | tee "$OUTDIR/$1.log"
done
timeout 90 python3 -m benchmarks.offload_bench --shape smollm2-135m --dtype bf16 --seq 64 --batch 4 --steps 3 \
    --reps 5 --modes resident,resident_whole_copies --out "$OUTDIR/smollm2_whole_copies.json" 2>&1 | grep -v '^\[' \
    | tee "$OUTDIR/smollm2_whole_copies.log" | grep -E "_median|_over_|peak_gpu|identical"
timeout 150 python3 -m benchmarks.run --sections gpu_memory --out "$OUTDIR/smollm2_gpu_memory.json" 2>&1 \
    | grep -v '^\[' | grep -v '^|' | tail -4
echo "--- summary (python -m benchmarks.gpu_summary) ---"
python3 -m benchmarks.gpu_summary "$OUTDIR" 2>&1 | grep -v '^\['
