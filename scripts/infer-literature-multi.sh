#!/usr/bin/env bash
# A multi-turn liver-cancer chat with a literature adapter: type a question per line; EOF (Ctrl-D) or `exit` ends.
#
#   bash scripts/infer-literature-multi.sh
#   printf '肝癌有哪些危险因素？\n怎么预防？\n' | bash scripts/infer-literature-multi.sh
#   BASE_MODEL=/path/to/llama-7b-hf LORA_WEIGHTS=/path/to/lora-literature bash scripts/infer-literature-multi.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
run_literature multi "$@"
