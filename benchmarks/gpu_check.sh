#!/usr/bin/env bash
# The GPU check: at most GPU_CHECK_BUDGET_S seconds (default 540) on one H100/H200, sections in order of need, each cut
# to the time left, so a slow host loses the last sections, not the first. Prepare here with
# benchmarks/fetch_gpu_wheels.sh, then run on the device machine from the repository root, carrying .whl:
#     bash benchmarks/gpu_check.sh            (device tool: timeout_s 590)
# Writes its logs and JSON to $OUT (default /tmp/gpu_check; 8 files, the device tool's limit) and prints, in order:
#  - tests/test_cuda.py and tests/test_fused_triton.py (CUDA code paths, the counter-based z kernel against its
#    numpy definition, the fused perturb/update kernels against the unfused passes bit for bit, and the fine-tuning
#    job with ZeRO-3 offload on the GPU);
#  - the fused kernels' self-check on the GPU in a process of its own: should they crash, the OPT sections run with
#    --unfused (the unfused passes only, no model calibration) instead of failing;
#  - for OPT-1.3B and OPT-6.7B shapes in bf16 at seq 2048, batch 1 and 4: pinned H2D/D2H memcpy GB/s, ZO step time
#    offload vs all-resident, each beside an engine with the unfused passes (*_unfused: z drawn into scratch, then
#    torch's element-wise ops, the sixteenth session's GPU path; OPT-6.7B resident only; the parameters must come
#    out identical) (every repetition's time kept: the host's speed drifts), each mode's peak GPU memory
#    (batch 1, the setting of ZO2's published figures), offload-vs-resident exactness; per batch, one diagnosed step:
#    the H2D rate during the uploads against memcpy, the seconds compute waited for uploads, the host seconds in
#    the pipeline's begin/enter/exit; the GPU's kernel-busy fraction of a step and each mode's host ops (profiler);
#    and ds_zo.perfmodel calibrated on this GPU against the steps: device rates timed queued (the kernels' own
#    time), host costs fitted per mode to ZO steps of two small shapes sampled between the repetitions, the
#    micro-measured host costs beside them;
#  - the offload pipeline's host time per unit visit and its primitives (benchmarks/pipeline_host.py), printed;
#  - SmolLM2-135M's peak GPU memory (bf16, 4 x 64 tokens), one fresh process per mode, all at once: inference with
#    and without HF's loss, ds_zo all-resident (the default: embedding and output layer from row blocks, the span
#    capped by the model's layers and size; dszo_span<N>: a span of N chunks; dszo_whole_copies: row_blocks "off") and
#    with offload, MeZO's loop;
#  - SmolLM2's ZO step with zero_order.row_blocks "off" beside the default (all-resident, interleaved: step times,
#    each engine's peak, host ops, GPU busy fraction);
#  - at the end, benchmarks/gpu_summary.py: the figures issue #6 needs, in a few lines.
# OPT-1.3B offloaded with zero_order.row_blocks "off" beside the default (measured in the tenth and twelfth sessions)
# is left out to fit: add offload_whole_copies to its modes for it.
# offload_bench --prefetch 1,2 adds an offload engine per depth; --trace DIR writes each mode's chrome trace.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-540}
source benchmarks/gpu_env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# section NAME CAP_S MIN_S COMMAND...: runs COMMAND under a timeout of CAP_S or the budget's rest, whichever is less;
# skipped when less than MIN_S (what it needs to give a first result) is left. The benchmarks write what they have
# measured after each batch size, so a section cut short still leaves its first figures for the summary.
section() {
    local name=$1 cap=$2 min=$3 left=$((BUDGET - (SECONDS - START)))
    shift 3
    if ((left < min)); then echo "--- $name: skipped, ${left} s of the budget left (needs ${min})"; return; fi
    local t=$((cap < left ? cap : left)) t0=$SECONDS
    echo "--- $name (limit ${t} s)"
    timeout -k 10 "$t" "$@"       # then SIGKILL: nothing may outlast the device call
    echo "--- $name: $((SECONDS - t0)) s"
}
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
smollm2_memory() {
    python3 -m benchmarks.run --sections gpu_memory --out "$OUTDIR/smollm2_gpu_memory.json" 2>&1 \
        | grep -v '^\[' | grep -v "^|" | grep -E "^memory probe|^GPU peak|failed|Error|needs" | cut -c1-400
}
cuda_tests() {
    python3 -m pytest -q -p no:cacheprovider -m "not multiprocess" tests/test_cuda.py tests/test_fused_triton.py 2>&1 \
        | tee "$OUTDIR/cuda_tests.log" | tail -8
}
opt() {   # opt SHAPE STEPS MODES [FLAGS]: FLAGS default --calibrate (--unfused where the fused kernels crash)
    python3 -m benchmarks.offload_bench --shape "$1" --dtype bf16 --seq 2048 --batch 1,4 --span-chunks 8 \
        --steps "$2" --reps 5 --modes "$3" ${4:---calibrate} --out "$OUTDIR/$1.json" 2>&1 | grep -v '^\[' \
        | tee "$OUTDIR/$1.log"
}
# the fused kernels' self-check on this GPU in a process of its own: a mismatch only makes the engines fall back
# (and is printed), but a crash (a CUDA error) would end every benchmark that builds an engine, so then the OPT
# sections time the unfused passes alone and skip the model's calibration (which times the fused kernels)
fused_probe() {
    timeout -k 5 120 python3 -c "import torch; from ds_zo import triton_passes as t
for d in (torch.bfloat16, torch.float32): print('fused kernels, self-check', d, ':', t.self_check('cuda:0', d) or 'ok')" \
        2>&1 | grep -v '^\[' | tail -4
    return "${PIPESTATUS[0]}"
}
smollm2_whole_copies() {
    python3 -m benchmarks.offload_bench --shape smollm2-135m --dtype bf16 --seq 64 --batch 4 --steps 3 --reps 5 \
        --modes resident,resident_whole_copies --out "$OUTDIR/smollm2_whole_copies.json" 2>&1 | grep -v '^\[' \
        | tee "$OUTDIR/smollm2_whole_copies.log" | grep -E "_median|_over_|peak_gpu|identical"
}
# timeout signals its child's whole process group, so a section's pipeline ends with it
export OUTDIR
export -f smollm2_memory cuda_tests opt smollm2_whole_copies fused_probe
# caps from the twelfth session's H100 host, the slowest yet (CUDA tests 114 s; the list as it was then, with
# OPT-1.3B's whole-copies engine, about 11 minutes); the caps add up to more than the budget, so the last sections
# take what is left. Since the seventeenth session the OPT sections time engines with the unfused passes beside the
# default fused kernels (the sixteenth timed the chunked z sampler there: *_chunked_z modes), and SmolLM2's memory
# (measured in the fifteenth) comes after them.
section "CUDA tests" 150 60 bash -c cuda_tests
if fused_probe; then
    section "OPT-1.3B" 160 60 bash -c "opt opt-1.3b 2 resident,offload,resident_unfused,offload_unfused"
    section "OPT-6.7B" 220 120 bash -c "opt opt-6.7b 1 resident,offload,resident_unfused"
else
    echo "--- the fused kernels crashed here: the OPT sections run unfused, without the model's calibration"
    section "OPT-1.3B" 160 60 bash -c "opt opt-1.3b 2 resident,offload --unfused"
    section "OPT-6.7B" 220 120 bash -c "opt opt-6.7b 1 resident,offload --unfused"
fi
# the offload pipeline's host time per unit visit and its primitives beside what they replaced (printed only: the
# device tool returns at most 8 files)
section "pipeline host" 45 20 bash -c "python3 -m benchmarks.pipeline_host --reps 5 2>&1 | grep -v '^\['"
section "SmolLM2 GPU memory" 120 45 bash -c smollm2_memory
section "SmolLM2 whole copies" 90 45 bash -c smollm2_whole_copies
rm -f "$OUTDIR"/*.tmp      # a JSON write cut off by a timeout (the device tool returns at most 8 files)
echo "--- summary (python -m benchmarks.gpu_summary; $((SECONDS - START)) s so far) ---"
python3 -m benchmarks.gpu_summary "$OUTDIR" 2>&1 | grep -v '^\['
