#!/usr/bin/env bash
# Create ./.venv with everything the project needs and install it editable.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project
# is tested with; GPU users run `TORCH_SPEC=torch bash scripts/setup.sh`
# (or pre-install their CUDA torch) to get the build for their platform.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "Environment ready: source $VENV/bin/activate"
