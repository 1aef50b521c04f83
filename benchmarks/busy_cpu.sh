#!/usr/bin/env bash
# The Quick start's training on a CPU that other work keeps busy: torch's threads and OpenMP's wait policy compared.
#
#   bash benchmarks/busy_cpu.sh [STEPS]      # default 20 steps of the tiny model (scripts/finetune.sh's base)
#
# Each setting trains the same 20 steps three times: on the idle machine, with one spinning process per core started
# here (`yes > /dev/null`), and with two per core. One line per run: the setting, the load, the training loop's
# seconds per step (`train_loop_s` of finetune.py's summary line) and the final training loss.
# The settings: the scripts' default (OpenMP threads wait passively, utils/__init__.py; threads as cores are idle at
# the start); all cores' threads, waiting passively; torch's own default before (libgomp's spinning wait, which an
# invalid OMP_WAIT_POLICY leaves in place; its warning is dropped); one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${1:-20}
CORES=$(nproc)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1
"$PYTHON" -m utils.tiny_base --output_dir "$work/base" >/dev/null

train() {  # train LABEL LOAD ENV... : one run, its seconds per step
  local label=$1 load=$2
  shift 2
  local summary
  summary=$(env "$@" "$PYTHON" finetune.py --base_model "$work/base" --output_dir "$work/out-$RANDOM" \
    --max_steps "$STEPS" --learning_rate 2e-3 --batch_size 32 --micro_batch_size 16 --cutoff_len 256 \
    --eval_steps 1000 --save_steps 1000 --logging_steps 5 --warmup_steps 10 --val_set_size 0 2>/dev/null \
    | grep '^summary: ')
  "$PYTHON" - "$label" "$load" "$STEPS" "$summary" <<'EOF'
import json, sys
label, load, steps, line = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
summary = json.loads(line[len("summary: "):])
print(f"{label:44s} {load:14s} {summary['train_loop_s'] / steps:6.2f} s/step  loss {summary['train_loss']}", flush=True)
EOF
}

for hogs in 0 "$CORES" $((2 * CORES)); do
  kill $(jobs -p) 2>/dev/null || true
  for _ in $(seq "$hogs"); do yes > /dev/null & done
  [ "$hogs" = 0 ] && load=idle || load="$hogs x yes"
  sleep 3
  train "default" "$load"
  train "OMP_NUM_THREADS=$CORES (passive wait)" "$load" OMP_NUM_THREADS="$CORES"
  train "OMP_NUM_THREADS=$CORES, spinning wait (before)" "$load" OMP_NUM_THREADS="$CORES" OMP_WAIT_POLICY=
  train "OMP_NUM_THREADS=1" "$load" OMP_NUM_THREADS=1
done
