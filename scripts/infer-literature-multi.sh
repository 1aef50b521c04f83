#!/usr/bin/env bash
# A multi-turn liver-cancer chat with a literature adapter: type a question per line; EOF (Ctrl-D) or `exit` ends.
#
#   bash scripts/infer-literature-multi.sh
#   printf '肝癌有哪些危险因素？\n怎么预防？\n' | bash scripts/infer-literature-multi.sh
#   BASE_MODEL=/path/to/llama-7b-hf LORA_WEIGHTS=/path/to/lora-literature bash scripts/infer-literature-multi.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
use_tiny_default
LORA_WEIGHTS=${LORA_WEIGHTS:-lora-literature}
require_adapter "$LORA_WEIGHTS" "train one with: DATA_PATH=data_literature/liver_cancer.json PROMPT_TEMPLATE=literature_template OUTPUT_DIR=lora-literature bash scripts/finetune.sh"

"$PYTHON" infer_literature.py \
  --base_model "$BASE_MODEL" \
  --lora_weights "$LORA_WEIGHTS" \
  --use_lora True \
  --single_or_multi multi \
  --prompt_template literature_template \
  "$@"
