#!/usr/bin/env bash
# SmolLM2-135M on a GPU at each accelerator span (ds_zo.perturb.accelerator_span_chunks), about 3 minutes:
#  - peak GPU memory of every mode of run.py's gpu_memory section (bf16, 4 x 64, the probes at once), the span modes
#    beside the engine's own choice, and what was allocated at ds_zo's peak (memory_probe --peak-breakdown, the
#    allocator's trace replayed);
#  - the all-resident ZO step's time at spans of 1, 2, 4 and 8 chunks, interleaved (offload_bench).
# Prepare as for gpu_check.sh (benchmarks/fetch_gpu_wheels.sh), then on the device machine (carry .whl):
#     bash benchmarks/gpu_span_check.sh            (device tool: timeout_s 240)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
START=$SECONDS
# the breakdown's probe beside the section's (each figure is its own process's allocator peak)
timeout -k 10 150 python3 -m benchmarks.memory_probe --device cuda --mode dszo --peak-breakdown \
    > "$OUTDIR/smollm2_peak_breakdown.log" 2> "$OUTDIR/smollm2_peak_breakdown.err" &
timeout -k 10 150 python3 -m benchmarks.run --sections gpu_memory --out "$OUTDIR/smollm2_gpu_memory.json" 2>&1 \
    | grep -E "^memory probe|^GPU peak|failed|Error" | cut -c1-300
wait
python3 - "$OUTDIR/smollm2_peak_breakdown.log" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (IndexError, ValueError, OSError) as e:
    sys.exit(f"no breakdown: {e}")
b = r.get("peak_breakdown", {})
print(f"dszo peak {r['peak_gpu'] / 1e6:.1f} MB (span {r.get('span_chunks')}); replayed trace: "
      f"{b.get('peak_bytes', 0) / 1e6:.1f} MB in {b.get('blocks')} blocks {b.get('error', '')}")
for t in b.get("top", []):
    print(f"  {t['bytes'] / 1e6:7.2f} MB  {t['blocks']:4d}  {t['where']}")
print(f"  {b.get('rest_bytes', 0) / 1e6:7.2f} MB  (the rest)")
PY
echo "--- memory: $((SECONDS - START)) s"
timeout -k 10 $((230 - (SECONDS - START))) python3 -m benchmarks.offload_bench --shape smollm2-135m --dtype bf16 \
    --seq 64 --batch 4 --steps 3 --reps 5 --modes resident --span-chunks 1,2,4,8 --no-profile \
    --out "$OUTDIR/smollm2_spans.json" 2>&1 | grep -v '^\[' | grep -E "span|step_s_median|peak" | cut -c1-400
echo "--- $((SECONDS - START)) s"
rm -f "$OUTDIR"/*.tmp
python3 -m benchmarks.gpu_summary "$OUTDIR" 2>&1 | grep -v '^\['
