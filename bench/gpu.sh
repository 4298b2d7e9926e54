#!/usr/bin/env bash
# The GPU checks of BUILD.md, as one script (a few minutes on one modern GPU):
#   1. bench/train.py on the GPU(s): the 224-px paper model, default strategy and mirrored
#      over the GPUs present, each precision (float32, mixed_bfloat16, mixed_float16), XLA
#      off and on; every configuration in its own fresh process, interleaved, repeated;
#   2. bench/pipeline.py on the machine's CPUs: prepared shards vs original JPEGs, bare
#      decode, the tf.data service through 2 local workers, folder indexing.
# Writes one JSON file per run into $OUT (default: bench-gpu-results/) and prints the card.
#
# Run from the repo root, with the venv set up (make setup):  bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-gpu-results}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
for precision in float32 mixed_bfloat16 mixed_float16; do
  for jit in false true; do
    echo "== bench/train.py precision=$precision jit_compile=$jit" >&2
    "$PY" bench/train.py --repeats "$REPEATS" --batch_size 256 --steps 20 \
      --precision "$precision" --jit_compile "$jit" >"$OUT/train_${precision}_jit_${jit}.json"
  done
done
echo "== bench/pipeline.py (CPUs)" >&2
"$PY" bench/pipeline.py --repeats "$REPEATS" >"$OUT/pipeline.json"
echo "wrote $OUT/" >&2
