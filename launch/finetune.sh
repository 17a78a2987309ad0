#!/usr/bin/env bash
# The main job: sets everything up from nothing (launch/setup_env.sh), then runs the default ZO fine-tune on CPU
# (or GPU when present). Extra arguments go to `python -m ds_zo.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
exec .venv/bin/python -m ds_zo.train "$@"
