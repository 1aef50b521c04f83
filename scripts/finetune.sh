#!/usr/bin/env bash
# Train a BenTsao LoRA adapter.
#
#   bash scripts/finetune.sh                                   # tiny embedded default model, data/llama_data.json
#   BASE_MODEL=/path/to/llama-7b-hf bash scripts/finetune.sh   # a real model (local folder or hub id)
#   BASE_MODEL=Qwen/Qwen2.5-7B OUTPUT_DIR=lora-qwen bash scripts/finetune.sh --num_epochs 3
#   DATA_PATH=data_literature/liver_cancer.json PROMPT_TEMPLATE=literature_template \
#     OUTPUT_DIR=lora-literature bash scripts/finetune.sh      # the literature adapter
#
# Environment: BASE_MODEL, DATA_PATH, OUTPUT_DIR, PROMPT_TEMPLATE, PYTHON, NPROC (processes; default: one per visible
# GPU, started with torchrun when more than one). Extra flags are passed to finetune.py
# (e.g. --resume_from_checkpoint True, --overwrite True, --lora_target_modules all-linear).
# With a real model this uses the published BenTsao recipe (10 epochs, lr 3e-4, cutoff 256, batch 128).
set -euo pipefail
source "$(dirname "$0")/common.sh"
use_tiny_default
DATA_PATH=${DATA_PATH:-data/llama_data.json}
OUTPUT_DIR=${OUTPUT_DIR:-lora-bentsao}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-med_template}

if [ "$USING_TINY_DEFAULT" = 1 ]; then
  # A 1.7M-parameter model learns fast and cheaply: bigger steps, fewer epochs, frequent checks.
  RECIPE=(--num_epochs 2 --learning_rate 2e-3 --batch_size 32 --micro_batch_size 16 --cutoff_len 256
          --eval_steps 40 --save_steps 80 --logging_steps 10 --warmup_steps 10)
else
  RECIPE=(--num_epochs 10 --learning_rate 3e-4 --batch_size 128 --micro_batch_size 8 --cutoff_len 256
          --val_set_size 120)
fi

# One process per GPU: finetune.py refuses one process driving several GPUs (the Trainer's nn.DataParallel would
# split packed batches wrongly). Under torchrun or Slurm already (LOCAL_RANK set), run as we are.
if [ -z "${NPROC:-}" ] && [ -z "${LOCAL_RANK:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 1)
fi
LAUNCH=("$PYTHON")
if [ "${NPROC:-1}" -gt 1 ] && [ -z "${LOCAL_RANK:-}" ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
  echo "starting $NPROC processes, one per GPU: ${LAUNCH[*]} finetune.py ..." >&2
fi

"${LAUNCH[@]}" finetune.py \
  --base_model "$BASE_MODEL" \
  --data_path "$DATA_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --prompt_template_name "$PROMPT_TEMPLATE" \
  "${RECIPE[@]}" \
  "$@"
