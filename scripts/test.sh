#!/usr/bin/env bash
# Compare, on the same questions, the base model without an adapter (ori_template), an Alpaca adapter if you have
# one (alpaca template) and the medical adapter (med_template), then print a table of scores.
#
#   bash scripts/test.sh                                   # tiny default + lora-bentsao on data/infer.json
#   BASE_MODEL=/path/to/llama-7b-hf LORA_WEIGHTS=lora-bentsao ALPACA_LORA=tloen/alpaca-lora-7b bash scripts/test.sh
#
# Environment: BASE_MODEL, LORA_WEIGHTS (lora-bentsao), ALPACA_LORA (optional), INSTRUCT_DIR (data/infer.json),
# OUT_DIR (outputs/test). Writes OUT_DIR/{base,alpaca,med}.jsonl (answers) and .txt (printed blocks).
# Extra flags go to every infer.py run (e.g. --max_new_tokens 128).
set -euo pipefail
source "$(dirname "$0")/common.sh"
use_tiny_default
LORA_WEIGHTS=${LORA_WEIGHTS:-lora-bentsao}
INSTRUCT_DIR=${INSTRUCT_DIR:-data/infer.json}
OUT_DIR=${OUT_DIR:-outputs/test}
require_adapter "$LORA_WEIGHTS" "train one with: bash scripts/finetune.sh (or set LORA_WEIGHTS)"
mkdir -p "$OUT_DIR"
GENERATION=()
if [ "$USING_TINY_DEFAULT" = 1 ]; then
  GENERATION=(--max_new_tokens 96 --num_beams 1 --repetition_penalty 1.3)
fi

answer() {  # answer NAME TEMPLATE [infer.py flags...]
  local name=$1 template=$2
  shift 2
  echo "== $name ($template)" >&2
  "$PYTHON" infer.py --base_model "$BASE_MODEL" --instruct_dir "$INSTRUCT_DIR" --prompt_template "$template" \
    --output_file "$OUT_DIR/$name.jsonl" "$@" "${GENERATION[@]}" "${EXTRA[@]}" > "$OUT_DIR/$name.txt"
}
EXTRA=("$@")

RESULTS=()
answer base ori_template --use_lora False
RESULTS+=("$OUT_DIR/base.jsonl")
if [ -n "${ALPACA_LORA:-}" ]; then
  answer alpaca alpaca --use_lora True --lora_weights "$ALPACA_LORA"
  RESULTS+=("$OUT_DIR/alpaca.jsonl")
fi
answer med med_template --use_lora True --lora_weights "$LORA_WEIGHTS"
RESULTS+=("$OUT_DIR/med.jsonl")

"$PYTHON" evaluate.py --compare "${RESULTS[@]}"
