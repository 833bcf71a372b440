#!/usr/bin/env bash
# The GPU gate (issue 16): the GPU test suite, then compute-sanitizer memcheck, racecheck, synccheck and
# initcheck over the kangaroo kernels (CUDA and Triton, eager and inside captured and conditional CUDA
# graphs), all into ONE log headed by the commit it ran on. Gate: zero sanitizer reports in kangaroo
# kernels (reports in torch's or cuBLAS's kernels are listed, not gated).
#
#   scripts/gpu_check.sh [--log FILE] [--k EXPR] [STEP...]   steps, in order: tests memcheck racecheck
#                                                            synccheck initcheck gate (default: all)
#   scripts/gpu_check.sh --stale [--log FILE]                no GPU: is the log older than the last commit
#                                                            touching csrc/ or triton_kernels/? (exit 1 if so)
#
# The device tool allows 10 minutes a command: run one or two steps per call; the steps of one commit
# append to the same log (a step run at another commit starts a new log), and `gate` judges the last
# result of each tool. --log: default bench/results/gpu_check.log (commit it). --k: a pytest -k expression
# that narrows the sanitizer runs (default: every backend but the reference one). Raw sanitizer output
# goes to $OUT (the device tool's result folder; default /tmp/out), the log keeps the attributed reports.
# The commit is KANGAROO_COMMIT if set (a device copy's .git may be stale), else git's HEAD; the
# conventions are those of scripts/gpu_stage_b_and_test.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=bench/results/gpu_check.log
K="not reference"
STALE=0
steps=()
while [ $# -gt 0 ]; do
  case $1 in
    --log) LOG=$2; shift 2 ;;
    --k) K=$2; shift 2 ;;
    --stale) STALE=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) steps+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}

log_commit() { [ -f "$LOG" ] && sed -n 's/^commit: \([0-9a-f]\{7,40\}\).*/\1/p' "$LOG" | head -1; }

if [ "$STALE" = 1 ]; then
  touched=$(git log -1 --format=%H -- csrc triton_kernels 2>/dev/null)
  ran=$(log_commit)
  if [ -z "$ran" ]; then
    echo "stale: no gate log at $LOG (last kernel change: ${touched:0:12})"; exit 1
  fi
  if ! git cat-file -e "$ran^{commit}" 2>/dev/null; then
    echo "stale: $LOG ran on $ran, which this clone does not have"; exit 1
  fi
  verdict=$(grep -E '^GATE (PASS|FAIL)' "$LOG" | tail -1)
  if [ -n "$touched" ] && ! git merge-base --is-ancestor "$touched" "$ran"; then
    echo "stale: $LOG ran on ${ran:0:12}, before ${touched:0:12} ($(git log -1 --format=%s "$touched" | cut -c1-70)) changed csrc/ or triton_kernels/"
    exit 1
  fi
  echo "fresh: $LOG ran on ${ran:0:12}, at or after the last change to csrc/ or triton_kernels/ (${touched:0:12}); ${verdict:-no gate verdict yet}"
  exit 0
fi

OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$(dirname "$LOG")"
export PYTHONUNBUFFERED=1
COMMIT=${KANGAROO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
[ ${#steps[@]} -eq 0 ] && steps=(tests memcheck racecheck synccheck initcheck gate)

if [ "$(log_commit)" != "$COMMIT" ]; then   # a new commit starts a new log
  {
    echo "commit: $COMMIT"
    echo "date: $(date -u +%FT%TZ)"
    echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    $PY -c "import torch, triton; print('torch:', torch.__version__, 'CUDA', torch.version.cuda, '| triton:', triton.__version__)" 2>&1
    echo "sanitizer: $(compute-sanitizer --version 2>/dev/null | tail -1)"
  } > "$LOG"
fi
say() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }

# The GPU-only tests (marked gpu) and the test files whose cuda variants run on a GPU.
GPU_FILES="tests/test_ops.py tests/test_ops_decode.py tests/test_ops_linear.py tests/test_library.py tests/test_gpu_engine.py"
# Under the sanitizer: every kernel test plus the captured / conditional graphs and the engine's rounds.
OP_FILES="tests/test_ops.py tests/test_ops_decode.py tests/test_ops_linear.py tests/test_triton_resources.py"
GRAPH_FILES="tests/test_conditional_graphs.py tests/test_gpu_engine.py"

sanitize() {  # sanitize TOOL EXTRA_ENV FILES...: one sanitizer run, summarised into the log
  local tool=$1 env=$2; shift 2
  local raw="$OUT/sanitizer_${tool}_$(echo "$*" | md5sum | cut -c1-6).txt"
  echo "+ $env compute-sanitizer --tool $tool pytest $* -k '$K'" >> "$LOG"
  env $env compute-sanitizer --tool "$tool" --print-limit 10000 --error-exitcode 0 \
    $PY -m pytest -q -p no:cacheprovider -k "$K" "$@" > "$raw" 2>&1
  grep -E "passed|failed|error" "$raw" | grep -vE "^=========" | tail -2 >> "$LOG"
  echo "$raw"
}

for step in "${steps[@]}"; do
  case $step in
    tests)
      say "tests: pytest -m gpu, then $GPU_FILES"
      $PY -m pytest -q -m gpu tests 2>&1 | tail -15 | tee -a "$LOG"
      echo "TESTS suite=gpu rc=${PIPESTATUS[0]}" | tee -a "$LOG"
      $PY -m pytest -q $GPU_FILES 2>&1 | tail -15 | tee -a "$LOG"
      echo "TESTS suite=files rc=${PIPESTATUS[0]}" | tee -a "$LOG" ;;
    memcheck|racecheck|synccheck|initcheck)
      say "$step"
      raws=()
      if [ "$step" = memcheck ]; then
        # Without the caching allocator every tensor is its own allocation, so an access past a tensor's end
        # is out of bounds, not inside a pooled block; graphs need the allocator (no cudaMalloc in a capture).
        raws+=("$(sanitize "$step" PYTORCH_NO_CUDA_MEMORY_CACHING=1 $OP_FILES)")
      else
        raws+=("$(sanitize "$step" "" $OP_FILES)")
      fi
      raws+=("$(sanitize "$step" "" $GRAPH_FILES)")
      cat "${raws[@]}" > "$OUT/sanitizer_${step}.txt"
      $PY scripts/sanitizer_report.py "$step" "$OUT/sanitizer_${step}.txt" | tee -a "$LOG" | tail -12 ;;
    gate)
      say "gate"
      $PY scripts/sanitizer_report.py --gate "$LOG" | tee -a "$LOG"
      rc=${PIPESTATUS[0]}
      [ "$rc" -ne 0 ] && exit "$rc" ;;
    *) echo "unknown step '$step' (tests memcheck racecheck synccheck initcheck gate)" >&2; exit 2 ;;
  esac
done
