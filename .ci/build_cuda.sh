#!/usr/bin/env bash
# CUDA compile check for CI (no GPU needed): builds pypeft_fast._C with its CUDA kernels for
# sm_80 and sm_90a against a CUDA build of torch, fails on any compile error or register spill
# (ptxas -v), writes the registers/shared memory/spills per kernel, and imports the CUDA build
# on this GPU-less machine (ops registered for CUDA, nothing initialises a device).
#
#   bash .ci/build_cuda.sh            # venv created once (torch==2.14.1, ~5.5 GB, ~1.5 min), then reused
#
# Environment: CUDA_HOME (default /usr/local/cuda-13.0: the toolkit root, not an nvcc wrapper's
# directory), PYPEFT_FAST_CUDA_VENV (default ~/.cache/pypeft_fast/venv-cuda, outside the clone so
# that CI runs reuse it), PYPEFT_FAST_CUDA_TORCH (default torch==2.14.1), MAX_JOBS.
# Output: build/cuda-check/{build.log,ptxas.txt}.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PYPEFT_FAST_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pypeft_fast/venv-cuda}
TORCH_SPEC=${PYPEFT_FAST_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
OUT=$ROOT/build/cuda-check

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "build_cuda.sh: no nvcc under CUDA_HOME=$CUDA_HOME (set CUDA_HOME to the toolkit root)" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "build_cuda.sh: creating $VENV with $TORCH_SPEC (a CUDA build of torch)"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -r "$ROOT/requirements/build.txt" ninja numpy safetensors
fi
export PATH="$VENV/bin:$PATH"  # the venv's ninja (parallel compile)
"$VENV/bin/python" -c "import torch; print('build_cuda.sh: torch', torch.__version__, 'CUDA', torch.version.cuda)"

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$ROOT"
start=$(date +%s)
if ! PYPEFT_FAST_CUDA_ARCHS="80;90a" PYPEFT_FAST_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-2} \
    "$VENV/bin/python" setup.py build_ext --build-temp "$OUT/tmp" --build-lib "$OUT/lib" \
    >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40 >&2 || true
  echo "build_cuda.sh: FAILED to compile (full log: $OUT/build.log)" >&2
  exit 1
fi
echo "build_cuda.sh: compiled in $(( $(date +%s) - start )) s"
grep -q "building the C++ CPU and CUDA kernels" "$OUT/build.log" || {
  echo "build_cuda.sh: setup.py did not build the CUDA kernels:" >&2
  grep "pypeft_fast setup:" "$OUT/build.log" >&2
  exit 1
}

# ptxas -v: "Compiling entry function '<mangled>' for 'sm_90a'", then "Used N registers, ...",
# and "N bytes stack frame, N bytes spill stores, N bytes spill loads".
"$VENV/bin/python" - "$OUT/build.log" >"$OUT/ptxas.txt" <<'PY'
import re, subprocess, sys
log = open(sys.argv[1]).read().splitlines()
rows, cur = [], None
for line in log:
    m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
    if m:
        cur = {"kernel": m.group(1), "arch": m.group(2)}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = int(s.group(1)) if s else 0
names = [r["kernel"] for r in rows]
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
except OSError:
    dem = names
print(f"{'arch':<7} {'regs':>4} {'smem':>5} {'stack':>5} {'spill st/ld':>11}  kernel")
for r, d in zip(rows, dem):
    d = d.replace("(anonymous namespace)::", "").replace("pypeft_fast::", "")
    d = re.sub(r"^void ", "", re.sub(r"\(long.*$", "", d))
    d = re.sub(r"pypeft_fast::\w*_GLOBAL__N__\w*?_\d+", "", d)
    print(f"{r['arch']:<7} {r.get('regs', '?'):>4} {r.get('smem', 0):>5} {r.get('stack', 0):>5} "
          f"{str(r.get('spill_st', 0)) + '/' + str(r.get('spill_ld', 0)):>11}  {d}")
PY
cat "$OUT/ptxas.txt"
kernels=$(grep -c "Compiling entry function" "$OUT/build.log" || true)
if [ "$kernels" -eq 0 ]; then
  echo "build_cuda.sh: no ptxas output found (was -Xptxas -v dropped?)" >&2
  exit 1
fi
for arch in sm_80 sm_90a; do
  grep -q "for '$arch'" "$OUT/build.log" || { echo "build_cuda.sh: nothing compiled for $arch" >&2; exit 1; }
done
if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/build.log" >/dev/null; then
  echo "build_cuda.sh: FAILED: register spills (see $OUT/ptxas.txt)" >&2
  exit 1
fi
echo "build_cuda.sh: $kernels kernel compilations, no spills"

# Import the CUDA build here (no GPU): a copy of the package with the CUDA _C in it.
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
cp -r "$ROOT/pypeft_fast" "$OUT/pkg/"
rm -f "$OUT"/pkg/pypeft_fast/_C*.so
cp "$OUT"/lib/pypeft_fast/_C*.so "$OUT/pkg/pypeft_fast/"
(cd "$OUT/pkg" && "$VENV/bin/python" - <<'PY'
import torch
from pypeft_fast import native, registry
info = native._C.build_info()
print("build_cuda.sh: import ok,", info)
assert info["with_cuda"] and info["cuda_archs"] == "80;90a", info
for name in native._ops.SCHEMAS:
    op = getattr(torch.ops.pypeft_fast, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
cuda_ops = [n for n in native._ops.SCHEMAS if torch._C._dispatch_has_kernel_for_dispatch_key(
    getattr(torch.ops.pypeft_fast, n).default.name(), "CUDA")]
print("build_cuda.sh: CUDA kernels registered for", cuda_ops)
assert {"sparse_spmm_csr_t", "sparse_spmm_csr_t_acc", "sparse_sddmm_csr", "philox_dropout",
        "lowrank_dropout_down", "lowrank_dropout_bwd"} <= set(cuda_ops), cuda_ops
assert registry.why_unavailable("sparse", "cuda", torch.device("cuda")) is None
assert not torch.cuda.is_initialized(), "importing initialised CUDA"
PY
)
echo "build_cuda.sh: OK"
