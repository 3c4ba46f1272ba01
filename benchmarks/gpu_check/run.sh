#!/usr/bin/env bash
# The GPU check as one command; its steps and files are described in benchmarks/gpu_check/__main__.py.
#   bash benchmarks/gpu_check/run.sh OUT                   # a bare GPU machine: installs .whl/ first
#   bash benchmarks/gpu_check/run.sh OUT --cpu-rehearsal   # here, with the project's .venv
# .whl/ is made here by `python -m benchmarks.gpu_check.wheels` (the GPU machine has no network).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ " $* " == *" --cpu-rehearsal "* ]]; then
  PY=${PYTHON:-.venv/bin/python}
else
  if [ -d .whl ]; then
    t0=$SECONDS
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    echo "[gpu-check] installed $(ls .whl | wc -l) wheels in $((SECONDS - t0)) s" >&2
    export PATH=/tmp/site/bin:$PATH
  fi
  # Ray's workers import the project and the wheels through the environment they inherit.
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  PY=python3
fi
exec "$PY" -m benchmarks.gpu_check "$@"
