#!/usr/bin/env bash
# The one script to run on a lent GPU machine (no network there): the CUDA tests, then the
# GPU benchmark (save stall vs the raw pinned copy and DCP, first-save stall, page-locked
# bytes, the stall while a save is writing, load into CUDA tensors vs the raw copy).
#
# It uses the machine's own python3 (its CUDA build of torch and most of our dependencies)
# and installs only what is missing there from wheels carried in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl msgspec zstandard tenacity
# Device call: run(command="bash benchmarks/gpu_check.sh 4", carry=[".whl"], timeout_s=600)
# Each step runs under its own timeout and the whole stays inside 10 minutes; the
# benchmark deletes its files as it goes (the device disk is 64 GiB).
set -uo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-4}
PY=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS CMD...: run one step under a timeout, report, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
    status=1
  fi
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ckpt-site .whl/*.whl || { echo "!! installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/ckpt-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" - <<'PYEOF' || { echo "!! CUDA is not usable from $PY: nothing else can run"; exit 1; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
torch.ones(1, device="cuda").add_(1)
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
import msgspec, zstandard, tenacity, xxhash, safetensors  # noqa: F401  what ckpt needs
import ckpt, recovery, storage_backends  # noqa: F401
PYEOF
step "CUDA tests" 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda \
  tests/ckpt/test_staging.py tests/ckpt/test_engine.py tests/ckpt/test_state.py \
  tests/recovery/test_device_copy.py
step "GPU benchmark (${GIB} GiB)" 300 "$PY" -m benchmarks.bench_gpu --gib "$GIB" --repeats 3
exit "$status"
