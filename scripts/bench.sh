#!/usr/bin/env bash
# The main job: sets everything up on a fresh machine, then runs the end-to-end comparison
# (pypeft_fast vs peft on a built-in Llama-architecture model). Extra arguments go to
# `pypeft-fast bench` (see `pypeft-fast bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${VENV:-.venv}/bin/activate"
pypeft-fast bench "$@"
