#!/usr/bin/env bash
# One command for a GPU machine (an H100 or H200 with torch, Triton, nvcc and ninja, and no network):
# versions and nvidia-smi; the extension built in place for this GPU's architecture only, on every
# core, downloading nothing; the CUDA variants of the test suite (per-test timeout); every
# benchmark's GPU mode at bounded sizes; the rest of the suite with the time left; the GPU targets
# evaluated from the benchmarks' CSVs; all of it packed into $OUT (default ./gpu-out):
#   gpu-check.tar.gz   results/*.csv, logs/*.log, summary.md
#   summary.md         each step's status and time, and the targets table (met / not met / figure)
#
# GPU_CHECK_SKIP="step step ..." leaves named steps out (a rerun of the failed parts, say).
# Each step runs under its own time box and under a deadline for the whole script (GPU_CHECK_BUDGET,
# 480 s by default, less a reserve for packing): a failed or hung step is recorded and the next one
# runs. Plan for an H100 (how the boxes were estimated, in docs/ARCHITECTURE.md, "Validating on a
# GPU"): build 100-150 s on 16 cores, CUDA tests 60-120 s, benchmarks 40-70 s each.
#
#   bash scripts/gpu_check.sh             on the GPU machine
#   bash scripts/gpu_check.sh --dry-run   anywhere, without CUDA: every step's argument handling
#                                         (--help, pytest --collect-only) and the packing; CI runs it
set -uo pipefail  # no -e: a failing step must not stop the next
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-out}
BUDGET=${GPU_CHECK_BUDGET:-480}
RESERVE=20  # seconds kept for the targets table and the packing
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 60 ]; then
  echo "gpu_check.sh: GPU_CHECK_BUDGET must be a whole number of seconds >= 60, got '$BUDGET'" >&2
  exit 2
fi
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT='$OUT'" >&2; exit 2; }
WORK=$(mktemp -d)
mkdir -p "$WORK/results" "$WORK/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled Triton on the GPU, never the interpreter
START=$(date +%s)
SUMMARY="$WORK/summary.md"
{
  echo "# fastprune GPU check"
  echo
  echo "| step | status | seconds | box |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

left() { echo $(( BUDGET - RESERVE - ($(date +%s) - START) )); }

# step NAME BOX_SECONDS DRY_MODE CMD...: DRY_MODE says what --dry-run does with CMD: "run" (run it
# as it is), "help" (CMD --help), "collect" (CMD --collect-only), "skip" (print it only).
step() {
  local name=$1 box=$2 dry=$3
  shift 3
  local log="$WORK/logs/$name.log" t0 status rc
  t0=$(date +%s)
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "| $name | skipped: GPU_CHECK_SKIP | 0 | 0 |" >> "$SUMMARY"
    echo "== $name: skipped (GPU_CHECK_SKIP)"
    return
  fi
  local budget_left
  budget_left=$(left)
  [ "$box" -gt "$budget_left" ] && box=$budget_left
  if [ "$box" -lt 5 ]; then
    echo "| $name | skipped: the deadline has passed | 0 | 0 |" >> "$SUMMARY"
    echo "== $name: skipped (no time left)"
    return
  fi
  echo "== $name (box ${box}s): $*"
  if [ "$DRY" = 1 ]; then
    case "$dry" in
      run) timeout -k 5 "$box" "$@" > "$log" 2>&1 ;;
      help) timeout -k 5 "$box" "$@" --help > "$log" 2>&1 ;;
      collect) timeout -k 5 "$box" "$@" --collect-only > "$log" 2>&1 ;;
      skip) echo "dry run: would run: $*" > "$log" ;;
    esac
  else
    timeout -k 10 "$box" "$@" > "$log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ "$DRY" = 1 ] && status="dry run: $status"
  echo "| $name | $status | $(( $(date +%s) - t0 )) | $box |" >> "$SUMMARY"
  tail -n 5 "$log" | sed 's/^/   /'
}

# --- 0. carried wheels (the machine has no network): torchattacks for the attack benchmark's peer ---
# Here, before the run: python3 -m pip download --no-deps -d .whl torchattacks==3.5.1 (pure Python),
# then name .whl in the run's carry list.
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 60 run "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

# --- 1. versions ---------------------------------------------------------------------------------
step versions 20 run bash -c "$PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -n 2; nproc; (nvidia-smi || echo 'no nvidia-smi here')"

# --- 2. build the extension in place for this GPU only -------------------------------------------
if [ "$DRY" = 1 ]; then ARCH="9.0"; else
  ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")
fi
step build 200 help env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace

# --- 3. the CUDA variants of the suite first ------------------------------------------------------
# Plugins load themselves unless PYTEST_DISABLE_PLUGIN_AUTOLOAD is set; naming an autoloaded one
# again with -p is an error ("Plugin already registered"), as the first H200 run found.
load() { [ -n "${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-}" ] && echo "-p $1"; }
TIMEOUT_FLAG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG=($(load pytest_timeout) --timeout=90)
# Several workers share the GPU: the CUDA tests' time is mostly Triton compiling kernels on the CPU.
XDIST_FLAG=()
[ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null && XDIST_FLAG=($(load xdist) -n 8)
# Each worker gets its share of the cores: 8 workers with a thread per core each trained the suite's
# CPU fixtures past the per-test timeout (second H200 run).
step tests-cuda 150 collect env TORCH_CUDA_ARCH_LIST="$ARCH" OMP_NUM_THREADS=$(( $(nproc) / 8 > 0 ? $(nproc) / 8 : 1 )) "$PY" -m pytest -q --maxfail=50 -k "cuda or gpu" "${TIMEOUT_FLAG[@]}" "${XDIST_FLAG[@]}" \
  -p no:cacheprovider --junitxml="$WORK/results/tests-cuda.xml" tests

# --- 4. benchmarks, GPU mode, bounded sizes --------------------------------------------------------
step bench-attacks 120 help "$PY" bench/attacks.py --device cuda --quick --out "$WORK/results"
step bench-hsic 60 help "$PY" bench/hsic.py --device cuda --quick --out "$WORK/results"
step bench-sparse 200 help "$PY" -m fastprune.cli bench sparse --device cuda --model resnet18 vgg16 \
  --sparsity 0.9 0.99 --batch 1 64 256 --repeats 5 --out "$WORK/results"
step bench-sparse-grad 60 help "$PY" -m fastprune.cli bench sparse-grad --device cuda --sparsity 0.99 --batch 128 \
  --repeats 3 --out "$WORK/results"
step profile 40 help "$PY" bench/profile_gpu.py --device cuda --out "$WORK/results"
step bench-train 60 help "$PY" bench/train.py --device cuda --quick --out "$WORK/results"

# --- 5. the rest of the suite with the time left -------------------------------------------------
step tests-rest 600 collect "$PY" -m pytest -q -k "not cuda and not gpu" "${TIMEOUT_FLAG[@]}" \
  -p no:cacheprovider --junitxml="$WORK/results/tests-rest.xml" tests

# --- 6. targets, summary, archive ----------------------------------------------------------------
RESERVE=0
step targets 15 run "$PY" -m fastprune.benchmarks.targets "$WORK/results" --out "$WORK/targets.md"
{
  echo
  echo "Total: $(( $(date +%s) - START )) s of a ${BUDGET} s budget$([ "$DRY" = 1 ] && echo ' (dry run)')."
  echo
  echo "## Targets"
  echo
  cat "$WORK/targets.md" 2>/dev/null || echo "(no targets table: see logs/targets.log)"
} >> "$SUMMARY"
cp "$SUMMARY" "$OUT/summary.md"
tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" results logs summary.md
echo
cat "$SUMMARY"
echo
echo "packed: $OUT/gpu-check.tar.gz ($(du -h "$OUT/gpu-check.tar.gz" | cut -f1)) and $OUT/summary.md"
rm -rf "$WORK"
