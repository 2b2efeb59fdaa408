#!/usr/bin/env bash
# The test suite with the GPU machine's versions, on this CPU: torch 2.11.0 (its CUDA 13.0 build,
# run on CPU) and triton 3.6.0, the versions scripts/gpu_check.sh meets on the lent H200, where
# there is no network and no time to find out. The CPU kernels are built against that torch in
# a copy of the checkout (the checkout's own build stays as it is), then tests/ runs there.
# What this has caught (2026-12-01): Triton 3.6 refusing an fp64 accumulator in tl.dot (every
# fp64 Triton kernel failed to compile for sm_90), torch 2.11's wrap_triton refusing an
# interpreted kernel, and a graph break of torch 2.11's dynamo in the one autograd Function.
#
#   bash .ci/device_versions.sh [pytest args]   # venv created once (~3 GB, ~2 min), then reused
#
# Environment: PYPEFT_FAST_DEVICE_VENV (default ~/.cache/pypeft_fast/venv-device, outside the
# clone so that CI runs reuse it), PYPEFT_FAST_DEVICE_TORCH (torch==2.11.0),
# PYPEFT_FAST_DEVICE_TRITON (triton==3.6.0), MAX_JOBS. numpy stays below 2.3: triton 3.6's
# interpreter converts one-element arrays with int(), which numpy 2.4 refuses (2.2 warns).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PYPEFT_FAST_DEVICE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pypeft_fast/venv-device}
TORCH_SPEC=${PYPEFT_FAST_DEVICE_TORCH:-torch==2.11.0}
TRITON_SPEC=${PYPEFT_FAST_DEVICE_TRITON:-triton==3.6.0}

want="${TORCH_SPEC#torch==} ${TRITON_SPEC#triton==}"
have=$("$VENV/bin/python" -c "import torch, triton; print(torch.__version__.split('+')[0], triton.__version__)" 2>/dev/null || true)
# The pinned requirements without torch/triton/numpy; a cached venv made from other ones is
# brought up to date, so that a dependency added to requirements/test.txt cannot be missing here.
reqs=$(grep -vE '^(torch|triton|numpy)([=<> ]|$)' "$ROOT/requirements/test.txt")
if [ "$have" != "$want" ]; then
  echo "device_versions.sh: creating $VENV with $TORCH_SPEC $TRITON_SPEC (have: ${have:-none})"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements/build.txt" 2>&1 | grep -v '^WARNING: Location' || true
fi
if [ "$have" != "$want" ] || [ "$reqs" != "$(cat "$VENV/requirements.txt" 2>/dev/null)" ]; then
  printf '%s\n' "$reqs" > "$VENV/requirements.txt.new"
  if ! "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" "numpy<2.3" \
      -r "$VENV/requirements.txt.new" > "$VENV/pip.log" 2>&1; then
    grep -v '^WARNING: Location' "$VENV/pip.log" | tail -20 >&2
    echo "device_versions.sh: FAILED to install the requirements into $VENV" >&2
    exit 1
  fi
  mv "$VENV/requirements.txt.new" "$VENV/requirements.txt"
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('device_versions.sh: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

# (not named pypeft_fast*: tests/test_package.py looks for that name in a top-level `kernels` origin)
COPY=$(mktemp -d "${TMPDIR:-/tmp}/ppf_device.XXXXXX")
trap 'rm -rf "$COPY"' EXIT
# Tracked and untracked-but-not-ignored files: what a commit of this working tree would hold.
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && tar --null -T - -cf -) |
  tar -xf - -C "$COPY"
cd "$COPY"
start=$(date +%s)
if ! PYPEFT_FAST_SKIP_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build_ext --inplace \
    > build.log 2>&1; then
  grep -E "error|Error" build.log | head -40 >&2 || true
  echo "device_versions.sh: FAILED to build against $TORCH_SPEC" >&2
  exit 1
fi
echo "device_versions.sh: built against $TORCH_SPEC in $(( $(date +%s) - start )) s"
# Register spills are judged with the pinned triton (tests/test_triton_compile.py in the main
# run). With 3.6 two variants spill that never run fast on an H200: the fp64 lowrank backward
# (268 bytes on sm_90) and two bf16 Kronecker tiles on sm_80 (8 bytes); bench/NOTES.md.
PYTHONPATH=$COPY TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 PYPEFT_FAST_REQUIRE_NATIVE=1 \
  "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider \
  --deselect tests/test_triton_compile.py::test_no_register_spills "$@"
