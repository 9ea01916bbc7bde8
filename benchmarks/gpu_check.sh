#!/usr/bin/env bash
# The one script to run on a lent GPU machine: the CUDA tests, then the GPU stall
# benchmark (ckpt async_save vs the raw pinned device-to-host copy and DCP async_save).
# Usage on the device: bash benchmarks/gpu_check.sh [GiB]   (prints everything to stdout)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q torch numpy   # the device's own CUDA build of torch
  .venv/bin/pip install -q -e ".[test]"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv || true
echo "== CUDA tests"
.venv/bin/python -m pytest -q -p no:cacheprovider -m cuda tests
echo "== GPU stall benchmark"
.venv/bin/python -m benchmarks.bench_gpu --gib "${1:-4}" --repeats 5
