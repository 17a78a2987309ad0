# Sourced by the GPU scripts on the device machine: the carried wheels (deepspeed and its pure-Python needs, which
# the GPU image lacks; benchmarks/fetch_gpu_wheels.sh saves them to .whl/) and the environment of a CUDA run.
if ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install the carried wheels (.whl/)"; exit 2; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# DS_ZO_NATIVE=0: the native sampler draws CPU z only; nothing on the GPU path needs it, so don't compile it there
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 DS_ZO_NATIVE=0
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
