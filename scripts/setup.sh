#!/usr/bin/env bash
# Create .venv (if missing) and install specdist with its test extras.
# torch==2.13.0 goes in first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==${SPECDIST_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
