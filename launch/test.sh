#!/usr/bin/env bash
# The test command: sets everything up from nothing (launch/setup_env.sh), then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -m "not multiprocess"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -ra "$@"
