# Shared by the launch scripts: gloo on CPU-only machines, over loopback on one node (all traffic on 127.0.0.1).
# A script launching several nodes sets MULTI_NODE=1 first: then gloo takes the interface that reaches the other
# nodes, not lo (it was lo there too, and the nodes could not connect), and MASTER_ADDR is the caller's to give.
# No cd: the job's paths (--train_file data.csv, --output_dir runs/x) are the caller's, relative to where it runs.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MULTI_NODE=${MULTI_NODE:-0}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [ "$MULTI_NODE" = 0 ]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
    fi
fi
NPROC=${NPROC:-2}
if [ "$MULTI_NODE" = 0 ]; then
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
MASTER_PORT=${MASTER_PORT:-$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
export MASTER_ADDR MASTER_PORT
