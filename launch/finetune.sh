#!/usr/bin/env bash
# The main job: sets everything up from nothing (launch/setup_env.sh), then runs the default ZO fine-tune —
# SmolLM2-135M-Instruct on IMDB sentiment, 2 ranks, perturbation parallel (one sign per rank) — and prints the
# zero-shot and fine-tuned test accuracy. Extra arguments go to `python -m ds_zo.train` (see --help).
# Relative paths in the arguments are taken from where it is run; the default output is the repository's outputs/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/launch/setup_env.sh"
NPROC=${NPROC:-2} bash "$ROOT/launch/torchrun.sh" \
    --deepspeed_config "${DS_CONFIG:-$ROOT/configs/smollm2_imdb_pertp2.json}" \
    --output_dir "${OUTPUT_DIR:-$ROOT/outputs/smollm2_imdb}" "$@"
