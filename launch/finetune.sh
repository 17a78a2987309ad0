#!/usr/bin/env bash
# The main job: sets everything up from nothing (launch/setup_env.sh), then runs the default ZO fine-tune —
# SmolLM2-135M-Instruct on IMDB sentiment, 2 ranks, perturbation parallel (one sign per rank) — and prints the
# zero-shot and fine-tuned test accuracy. Extra arguments go to `python -m ds_zo.train` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
NPROC=${NPROC:-2} bash launch/torchrun.sh --deepspeed_config "${DS_CONFIG:-configs/smollm2_imdb_pertp2.json}" \
    --output_dir "${OUTPUT_DIR:-outputs/smollm2_imdb}" "$@"
