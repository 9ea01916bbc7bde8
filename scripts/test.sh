#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: creates .venv, installs torch (CPU
# build 2.13.0 on these machines), the package with its test extra, makes sure a
# redis-server binary exists (tests start their own servers on free ports), then
# runs ruff (lint and format check), mypy (strict, package, tests and benchmarks) and
# pytest, whose tests/test_layers.py holds the layers contract. Extra arguments go to
# pytest (e.g. --full, -k name); pytest runs in CKPT_TEST_WORKERS (default 2) workers.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --disable-pip-version-check "torch==${CKPT_TORCH_VERSION:-2.13.0}"
fi
# The distribution was named "ckpt" before it became torch-ckpt: an old editable install
# in a reused .venv would shadow this checkout.
"$VPY" -m pip uninstall -q -y ckpt >/dev/null 2>&1 || true
"$VPY" -m pip install -q --disable-pip-version-check -e ".[test]"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found; installing it" >&2
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  fi
  command -v redis-server >/dev/null 2>&1 || { echo "cannot install redis-server" >&2; exit 1; }
fi

echo "== ruff"
"$VPY" -m ruff check ckpt recovery storage_backends tests benchmarks examples
"$VPY" -m ruff format --check ckpt recovery storage_backends tests benchmarks examples
echo "== mypy"
"$VPY" -m mypy
"$VPY" -m mypy examples
echo "== pytest"
set +e
# Two pytest workers, one test file each at a time (module fixtures are built once): most
# tests wait on subprocesses, servers and fsync, so two workers finish in about 3/4 of the
# time even on 2 cores. CKPT_TEST_WORKERS=0 runs everything in this process.
"$VPY" -m pytest -n "${CKPT_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
