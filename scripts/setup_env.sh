#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $VENV (default .venv), installs the pinned
# dependencies and builds/installs pypeft_fast in editable mode (the native extension is built
# against the torch in that venv: hence --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
echo "== installing pinned dependencies (requirements/build.txt, requirements/test.txt)"
python -m pip install -q -r requirements/build.txt 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -r requirements/test.txt 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, triton, peft, transformers" # fail loudly if the install did not happen
echo "== building and installing pypeft_fast (editable, --no-build-isolation)"
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
python -m pypeft_fast info
