#!/usr/bin/env bash
# Answer the questions of an infer file with a base model + LoRA adapter, printing golden and model answers.
#
#   bash scripts/infer.sh                                       # tiny default + lora-bentsao, data/infer.json
#   BASE_MODEL=/path/to/llama-7b-hf LORA_WEIGHTS=lora-bentsao bash scripts/infer.sh
#   INSTRUCT_DIR=my_questions.json bash scripts/infer.sh --output_file outputs/answers.jsonl
#
# Environment: BASE_MODEL, LORA_WEIGHTS, INSTRUCT_DIR, PROMPT_TEMPLATE, PYTHON. Extra flags go to infer.py.
set -euo pipefail
source "$(dirname "$0")/common.sh"
use_tiny_default
LORA_WEIGHTS=${LORA_WEIGHTS:-lora-bentsao}
INSTRUCT_DIR=${INSTRUCT_DIR:-data/infer.json}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-med_template}
require_adapter "$LORA_WEIGHTS" "train one with: bash scripts/finetune.sh (or set LORA_WEIGHTS)"
GENERATION=()
if [ "$USING_TINY_DEFAULT" = 1 ]; then
  # The tiny model repeats itself: short greedy answers with a repetition penalty keep the demo quick.
  GENERATION=(--max_new_tokens 96 --num_beams 1 --repetition_penalty 1.3)
fi

"$PYTHON" infer.py \
  --base_model "$BASE_MODEL" \
  --lora_weights "$LORA_WEIGHTS" \
  --use_lora True \
  --instruct_dir "$INSTRUCT_DIR" \
  --prompt_template "$PROMPT_TEMPLATE" \
  "${GENERATION[@]}" \
  "$@"
