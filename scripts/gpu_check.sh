#!/usr/bin/env bash
# The GPU verdict in one command: what a session with a lent GPU runs first (< 8 minutes on one
# H200). No network there: nothing is installed but this checkout (built in place).
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run] [--python PY] [--skip STEP,...]
#
# Steps (each time-boxed; a failed or timed-out step is recorded and the next one runs):
#   env     versions (python -m pypeft_fast info), nvidia-smi, nvcc
#   build   the CUDA kernels for this device's arch only (PYPEFT_FAST_CUDA_ARCHS, e.g. 90a on
#           an H100/H200), against this machine's torch: python setup.py build_ext --inplace
#   tests   the CUDA tests: tests/test_gpu_kernels.py (every family × triton/cuda × dtype vs
#           float64, the dropout mask bit for bit vs the CPU definition) + the cuda cases of
#           tests/test_native_ops.py; TRITON_INTERPRET=0 so Triton compiles for the GPU
#   micro   pytest bench/ --benchmark-only on the GPU shapes (bench/cases.py), every result
#           with its ratio to the frozen GEMM and the speed-up over peft
#   e2e     pypeft-fast bench --device cuda at a size that fills the GPU (tolerant: a flag it
#           does not know is recorded and the step retried with the plain command)
#   report  DIR/gpu_check.md: the step table, the micro-benchmark tables (bench/report.py),
#           the e2e table; the summary table is printed last
#
# --dry-run runs every step that needs no GPU, on this machine: argument parsing, the imports,
# the build's CPU part (setup.py's arch flags, the native extension loading), the CUDA tests'
# code paths on CPU tensors (PYPEFT_FAST_GPU_TESTS_DEVICE=cpu, fp32), a tiny CPU micro-benchmark
# run and the report generated from its JSON, and the e2e bench's tiny preset. CI runs it.
#
# Output (DIR: --out, else $OUT, else ./gpu_check_out): gpu_check.md, gpu_check.log, micro.json,
# micro.jsonl, micro.png, e2e.json, cuda_tests.xml (at most 8 files: the device tool returns 8).
# Time limits (seconds) can be changed: GPU_CHECK_T_BUILD (140), GPU_CHECK_T_TESTS (100),
# GPU_CHECK_T_MICRO (140), GPU_CHECK_T_E2E (75): at most 455 s of steps, plus ~20 s of env/report.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
OUTDIR=${OUT:-}
PY=${PYTHON:-python3}
SKIP=""
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTDIR=${2:?--out needs a directory}; shift ;;
    --out=*) OUTDIR=${1#--out=} ;;
    --python) PY=${2:?--python needs an interpreter}; shift ;;
    --skip) SKIP=${2:?--skip needs step names}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUTDIR=${OUTDIR:-$ROOT/gpu_check_out}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
STEPS=$OUTDIR/.steps.tsv   # step, status, seconds, note (folded into gpu_check.md, then removed)
: > "$LOG"; : > "$STEPS"
FAILS=0
T_BUILD=${GPU_CHECK_T_BUILD:-140}; T_TESTS=${GPU_CHECK_T_TESTS:-100}
T_MICRO=${GPU_CHECK_T_MICRO:-140}; T_E2E=${GPU_CHECK_T_E2E:-75}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $DRY = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
command -v "$PY" > /dev/null || { echo "gpu_check.sh: no python '$PY' (use --python)" >&2; exit 2; }

say() { echo "== gpu_check: $*" | tee -a "$LOG"; }
# step NAME SECONDS NOTE -- command...: runs it time-boxed, appends its output to the log and a
# row to the step table; never stops the script.
step() {
  local name=$1 limit=$2 note=$3; shift 4
  case ",$SKIP," in *",$name,"*) printf '%s\tskipped\t0\t--skip\n' "$name" >> "$STEPS"; say "$name: skipped"; return 0 ;; esac
  say "$name (limit ${limit}s): $note"
  echo "\$ $*" >> "$LOG"
  local t0=$SECONDS rc
  timeout -s INT -k 15 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local dt=$((SECONDS - t0)) status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMEOUT"; elif [ $rc != 0 ]; then status="FAILED (rc $rc)"; fi
  [ $rc = 0 ] || FAILS=$((FAILS + 1))
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$note" >> "$STEPS"
  say "$name: $status in ${dt}s"
  return $rc
}

# ------------------------------------------------------------------------------------- env
say "$( [ $DRY = 1 ] && echo 'DRY RUN (no GPU needed)' || echo 'GPU run' ), output in $OUTDIR"
step env 60 "versions, backends per device" -- bash -c '
  "$0" -c "import torch, triton, transformers, peft, pytest_benchmark, matplotlib
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__,
      \"transformers\", transformers.__version__, \"peft\", peft.__version__,
      \"pytest-benchmark\", pytest_benchmark.__version__)" || exit 1
  (command -v nvidia-smi > /dev/null && nvidia-smi -L) || echo "nvidia-smi: not here"
  (command -v nvcc > /dev/null && nvcc --version | tail -1) || echo "nvcc: not on PATH"' "$PY"
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA GPU visible to $PY: use --dry-run on a machine without one"
  printf 'gpu\tFAILED\t0\tno CUDA GPU visible\n' >> "$STEPS"
  FAILS=$((FAILS + 1))
fi

# ------------------------------------------------------------------------------------- build
# The device's arch: "90a" on sm_90 (wgmma), else major+minor; the dry run takes an H200's 9.0.
ARCH=$("$PY" - "$DRY" <<'EOF'
import sys
import torch
cap = (9, 0) if sys.argv[1] == "1" or not torch.cuda.is_available() else torch.cuda.get_device_capability()
print(f"{cap[0]}{cap[1]}" + ("a" if cap == (9, 0) else ""))
EOF
)
if [ $DRY = 1 ]; then
  # The CPU part of the build: setup.py's switches with this arch (without compiling: the CI
  # build of the CPU extension already ran), and the built extension loading (ABI, torch version).
  step build 120 "arch $ARCH: setup.py flags + the built extension loads" -- bash -c '
    PYPEFT_FAST_CUDA_ARCHS=$1 "$0" setup.py --version &&
    "$0" -c "from pypeft_fast import native; print(\"native build:\", native.BUILD_INFO)"' "$PY" "$ARCH"
else
  step build "$T_BUILD" "CUDA kernels for sm_$ARCH against this torch" -- bash -c '
    rm -f pypeft_fast/_C*.so
    MAX_JOBS=${MAX_JOBS:-$(nproc)} PYPEFT_FAST_CUDA_ARCHS=$1 "$0" setup.py build_ext --inplace &&
    "$0" -c "from pypeft_fast import native; assert native.WITH_CUDA, native.BUILD_INFO; print(native.BUILD_INFO)"' "$PY" "$ARCH"
  grep -E "spill|registers" "$LOG" | sort | uniq -c | sort -rn | head -5 >> "$LOG"
fi
"$PY" -m pypeft_fast info >> "$LOG" 2>&1

# ------------------------------------------------------------------------------------- tests
if [ $DRY = 1 ]; then
  step tests 300 "CUDA tests' code on CPU tensors (triton interpreter, cpp), fp32" -- env \
    PYPEFT_FAST_GPU_TESTS_DEVICE=cpu "$PY" -m pytest tests/test_gpu_kernels.py -q -p no:cacheprovider \
    -k "fp32 or mask" --junitxml="$OUTDIR/cuda_tests.xml"
else
  step tests "$T_TESTS" "every family × triton/cuda × dtype on CUDA vs float64; dropout mask bits" -- env \
    PYPEFT_FAST_REQUIRE_NATIVE=1 "$PY" -m pytest tests/test_gpu_kernels.py tests/test_native_ops.py -q \
    -p no:cacheprovider -k "cuda" --junitxml="$OUTDIR/cuda_tests.xml"
fi

# ------------------------------------------------------------------------------------- micro
rm -f "$OUTDIR/micro.jsonl"
if [ $DRY = 1 ]; then
  step micro 300 "tiny shapes on CPU, 2 rounds (report input)" -- "$PY" -m pytest bench -q \
    -p no:cacheprovider --benchmark-only --bench-selection tiny --bench-rounds 2 --bench-warmup 1 \
    -k "not triton" --benchmark-storage="file://$OUTDIR/.benchmarks" \
    --bench-rows "$OUTDIR/micro.jsonl" --benchmark-json "$OUTDIR/micro.json"
else
  step micro "$T_MICRO" "GPU shapes, bf16 with fp32 adapters; vs frozen GEMM and peft" -- "$PY" -m pytest bench -q \
    -p no:cacheprovider --benchmark-only --bench-device cuda --benchmark-columns=median,iqr,rounds \
    --benchmark-storage="file://$OUTDIR/.benchmarks" \
    --bench-rows "$OUTDIR/micro.jsonl" --benchmark-json "$OUTDIR/micro.json"
fi

# ------------------------------------------------------------------------------------- e2e
if [ $DRY = 1 ]; then
  E2E_ARGS=(--preset tiny --device cpu)
else
  # Llama-3-8B widths, 2 decoder layers, 4 × 1024 tokens: every projection GEMM ≥ 34 GFLOP
  # (≥ 1000 output tiles of 128 × 128: the whole GPU), small enough to build every variant in time.
  E2E_ARGS=(--device cuda --precision bf16 --hidden 4096 --intermediate 14336 --heads 32 --layers 2 --vocab 32000
            --batch 4 --seq 1024 --steps 5 --warmup 2)
fi
if ! step e2e "$T_E2E" "pypeft-fast bench ${E2E_ARGS[*]}" -- "$PY" -m pypeft_fast bench "${E2E_ARGS[@]}" \
    --no-progress --json "$OUTDIR/e2e.json"; then
  if tail -5 "$LOG" | grep -q "unrecognized arguments\|invalid choice"; then
    say "e2e: the bench does not take these flags any more: retrying with the plain command"
    step e2e-plain "$T_E2E" "pypeft-fast bench --device $( [ $DRY = 1 ] && echo cpu || echo cuda) (flags refused)" -- \
      "$PY" -m pypeft_fast bench --device "$( [ $DRY = 1 ] && echo cpu || echo cuda)" --json "$OUTDIR/e2e.json"
  fi
fi

# ------------------------------------------------------------------------------------- report
"$PY" - "$OUTDIR" "$DRY" <<'EOF' 2>> "$LOG"
import json, os, sys
import xml.etree.ElementTree as ET
sys.path.insert(0, "bench")
import report

out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, ".steps.tsv")) if l.strip()]
md = [f"# GPU check{' (dry run on CPU)' if dry else ''}", ""]
summary = [["step", "status", "s", "what"]] + [s for s in steps]
xml = os.path.join(out, "cuda_tests.xml")
if os.path.exists(xml):
    try:
        s = ET.parse(xml).getroot()
        s = s if s.tag == "testsuite" else s[0]
        a = {k: s.get(k, "0") for k in ("tests", "failures", "errors", "skipped")}
        summary.append(["tests: counts", "", "", f"{a['tests']} run, {a['failures']} failed, "
                        f"{a['errors']} errors, {a['skipped']} skipped (cuda_tests.xml)"])
    except Exception as e:  # noqa: BLE001
        summary.append(["tests: counts", "unreadable", "", str(e)])
rows = []
for name in ("micro.json", "micro.jsonl"):  # the JSONL survives a micro step cut by its timeout
    p = os.path.join(out, name)
    if os.path.exists(p) and os.path.getsize(p):
        try:
            rows = report.load_rows(p)
        except Exception as e:  # noqa: BLE001
            summary.append([f"micro: {name}", "unreadable", "", str(e)])
        if rows:
            break
if rows:
    md += [report.markdown_report(rows), ""]
    if report.plot(rows, os.path.join(out, "micro.png")):
        md += ["![ratio to the frozen GEMM](micro.png)", ""]
e2e = os.path.join(out, "e2e.json")
if os.path.exists(e2e):
    try:
        data = json.load(open(e2e))
        erows = data.get("rows", data) if isinstance(data, dict) else data
        try:  # the e2e bench's own table; its raw rows if that format changed
            from pypeft_fast.bench.report import table as e2e_table
            e2e_md = e2e_table(erows)
        except Exception as e:  # noqa: BLE001
            e2e_md = f"(table failed: {e})\n```\n{json.dumps(erows, indent=1)[:6000]}\n```"
        md += ["### End-to-end (pypeft-fast bench)", "", e2e_md, ""]
        print("\nend-to-end (pypeft-fast bench):\n" + e2e_md)
    except Exception as e:  # noqa: BLE001
        summary.append(["e2e: e2e.json", "unreadable", "", str(e)])
table = report._table(summary[0], summary[1:], markdown=True)
md = md[:2] + ["## Steps", "", table, ""] + md[2:]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md))
if rows:
    print(f"\nmicro-benchmarks: {len(rows)} results; the limit beside the measurement (mode full):")
    print(report.limit_table(rows, markdown=False))
else:
    print("\nmicro-benchmarks: no results")
print(f"\nreport: {os.path.join(out, 'gpu_check.md')}  log: {os.path.join(out, 'gpu_check.log')}\n")
print(report._table(summary[0], summary[1:], markdown=False))
EOF
rm -f "$STEPS"
rm -rf "$OUTDIR/.benchmarks"
# Exit status: 0 when every step passed (so CI fails on a dry run that broke).
exit $((FAILS > 0))
