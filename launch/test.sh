#!/usr/bin/env bash
# The test command: sets everything up from nothing (launch/setup_env.sh), then runs the suite in two phases — fast
# unit tests first, then the multi-process and slow ones (real ranks on 127.0.0.1, real SmolLM2). A per-test timeout
# (pyproject.toml) turns a hang into one failed test. Extra arguments run pytest once with them instead.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh || exit 1
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# DeepSpeed's CPU shm op is compiled on first use into torch's extension folder, by default one per user: two
# checkouts testing at once rebuilt it back and forth there (their venvs differ), and a killed build left a lock
# that hung the next test. Each checkout keeps its own.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
PYTEST=(.venv/bin/python -m pytest -q -ra -p no:cacheprovider)
if [ "$#" -gt 0 ]; then
    exec "${PYTEST[@]}" "$@"
fi
"${PYTEST[@]}" -m "not multiprocess and not slow"; fast=$?
"${PYTEST[@]}" -m "multiprocess or slow"; slow=$?
ok() { [ "$1" = 0 ] || [ "$1" = 5 ]; }   # 5: no test selected in that phase
ok "$fast" && ok "$slow" && [ "$fast$slow" != "55" ]
