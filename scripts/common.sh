# Shared by the scripts in this folder: the Python to use and the embedded tiny default model.
# Sourced, not run. PYTHON: the interpreter (default: python, else python3).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
TINY_BASE=${TINY_BASE:-models/tiny-llama}  # where the tiny default model is built
# TINY_BASE_FLAGS: extra flags for `python -m utils.tiny_base` (e.g. --pretrain_steps 0: seconds instead of a minute)

# use_tiny_default: when BASE_MODEL is unset, build the tiny base once (offline, under a minute) and use it.
use_tiny_default() {
  if [ -z "${BASE_MODEL:-}" ]; then
    BASE_MODEL=$TINY_BASE
    USING_TINY_DEFAULT=1
    export HF_HUB_OFFLINE=1
    if [ ! -f "$BASE_MODEL/config.json" ]; then
      echo "BASE_MODEL is not set: building the tiny embedded default model into $BASE_MODEL" >&2
      # shellcheck disable=SC2086 # TINY_BASE_FLAGS is a list of flags
      "$PYTHON" -m utils.tiny_base --arch llama --output_dir "$BASE_MODEL" ${TINY_BASE_FLAGS:-}
    fi
  else
    USING_TINY_DEFAULT=0
  fi
}

# require_adapter DIR HOW: fail with a hint when an adapter folder is missing.
require_adapter() {
  if [ ! -f "$1/adapter_config.json" ]; then
    echo "error: no adapter in $1; $2" >&2
    exit 2
  fi
}

# run_literature MODE ARGS...: infer_literature.py in MODE (single or multi) with a literature adapter
# (LORA_WEIGHTS, default lora-literature) on BASE_MODEL (default: the tiny embedded model).
run_literature() {
  local mode=$1
  shift
  use_tiny_default
  LORA_WEIGHTS=${LORA_WEIGHTS:-lora-literature}
  require_adapter "$LORA_WEIGHTS" "train one with: DATA_PATH=data_literature/liver_cancer.json PROMPT_TEMPLATE=literature_template OUTPUT_DIR=lora-literature bash scripts/finetune.sh"
  "$PYTHON" infer_literature.py \
    --base_model "$BASE_MODEL" \
    --lora_weights "$LORA_WEIGHTS" \
    --use_lora True \
    --single_or_multi "$mode" \
    --prompt_template literature_template \
    "$@"
}
