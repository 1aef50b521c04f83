#!/usr/bin/env bash
# Answer the built-in liver-cancer questions with a literature adapter.
#
#   bash scripts/infer-literature-single.sh                     # tiny default + lora-literature
#   BASE_MODEL=/path/to/llama-7b-hf LORA_WEIGHTS=/path/to/lora-literature bash scripts/infer-literature-single.sh
#
# Train the adapter first: DATA_PATH=data_literature/liver_cancer.json PROMPT_TEMPLATE=literature_template \
#   OUTPUT_DIR=lora-literature bash scripts/finetune.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
run_literature single "$@"
