#!/usr/bin/env bash
# Run HERE (a machine with registry access) before a GPU check: the GPU machine has torch, transformers and mpi4py
# but no deepspeed (nor pydantic/hjson) and no registry. Saves the missing wheels to .whl/ (git-ignored via
# .git/info/exclude), to be carried with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
PYV=${GPU_PYTHON_VERSION:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
# deepspeed is published as an sdist: build it into a pure-Python wheel here (the GPU machine cannot build)
$PIP wheel -q --no-deps -w .whl deepspeed==0.19.8
$PIP download -q --no-deps -d .whl hjson==3.1.0 annotated-types==0.8.0 typing-inspection==0.4.5 pydantic==2.14.4
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp $PLAT \
    -d .whl pydantic_core==2.50.5
rm -f .whl/*.tar.gz
ls -la .whl
