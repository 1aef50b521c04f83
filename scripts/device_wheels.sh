#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for its Python (CPython 3.12, x86-64 Linux), into .whl/ at the repository
# root (kept out of git through .git/info/exclude), then the size of what a device call sends: the working tree plus
# .whl/, which must stay within 64 MiB. No network there: what the scripts need beyond its image travels here.
#   bash scripts/device_wheels.sh
# Why these and not others (pyarrow, pandas, torch stay the image's): docs/multi_gpu.md, "The command for the GPU".
set -euo pipefail
cd "$(dirname "$0")/.."

pin() { grep -hE "^$1==" requirements.txt requirements-gpu.txt | head -1; }
WHEELS=(
  "$(pin transformers)" "$(pin peft)" "$(pin datasets)" "$(pin fire)"  # the image has transformers 5.17, no datasets/fire
  dill==0.4.1 multiprocess==0.70.19 termcolor==3.3.0                    # what datasets and fire import, absent there
  "$(pin bitsandbytes)"                                                 # --load_4bit (its CUDA 13 library inside)
)
LIMIT=$((64 * 1024 * 1024))

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
if [ -d shared ]; then tree=$((tree + $(du -sb shared | cut -f1))); fi
du -b .whl/*.whl | awk '{printf "  %6.1f MB  %s\n", $1 / 1e6, $2}'
total=$((wheels + tree))
awk -v w="$wheels" -v t="$tree" 'BEGIN { m = 1048576; printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB '\
'of the 64 MiB a device call may send\n", w / m, t / m, (w + t) / m }'
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: over 64 MiB: the device call would be refused; carry fewer wheels or shrink the tree" >&2
  exit 1
fi
