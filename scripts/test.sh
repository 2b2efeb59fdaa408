#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k lowrank`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${VENV:-.venv}/bin/activate"
# The native extension was just built: its tests must run, not skip.
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 PYPEFT_FAST_REQUIRE_NATIVE=1
python -m pytest tests -q "$@"
if [ $# -eq 0 ]; then
  # The whole suite also runs every kernel micro-benchmark case once, on tiny shapes, each
  # result checked against float64 (bench/test_kernels.py): the benchmarks cannot rot.
  python -m pytest bench -q --benchmark-disable --bench-selection tiny
fi
