#!/usr/bin/env bash
# FP8 training on one GPU in one run (docs/benchmarks.md §2): the official step with bf16 + compile
# and the project's bf16 step side by side at 32 a GPU, then the project's step with torchao's
# float8 recipes and layer sets at 32, then bf16 against the best float8 set at the largest batch
# that fits (256 on a 141 GB H200, 128 on an 80 GB H100).
#   bash benchmarks/float8_gpu.sh OUT_DIR [SETS]     SETS: "recipe:layer,layer ..." (default below)
# PARTS="side sets big" (the default) picks the parts to run, BIG the float8 set of the last one.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/float8_gpu.sh OUT_DIR}
source "$(dirname "$0")/fresh_out_dir.sh"
SETS=${2:-"tensorwise:qkv,proj,fc1,fc2 tensorwise:qkv,fc1,fc2 tensorwise:qkv,fc1 rowwise:qkv,proj,fc1,fc2"}
BIG=${BIG:-"tensorwise:qkv,fc1,fc2"}
PY=$(command -v "${PYTHON:-python}")
TRAIN="--model DiT-XL/2 --steps 30 --warmup 8"
PARTS=${PARTS:-"side sets big"}
[[ $PARTS == *side* ]] && $PY benchmarks/side_by_side.py --batch-size 32 --rounds 1 --json "$OUT/side_by_side.json"
[[ $PARTS == *sets* ]] && for set in $SETS; do
  recipe=${set%%:*}; layers=${set#*:}
  $PY -m dit.benchmark $TRAIN --batch-size 32 --float8 "$recipe" --float8-layers ${layers//,/ } \
    --json "$OUT/fp8_32_${recipe}_${layers//,/_}.json"
done
[[ $PARTS == *big* ]] || exit 0
BATCH=$($PY -c "import torch; print(256 if torch.cuda.get_device_properties(0).total_memory > 100e9 else 128)")
$PY -m dit.benchmark --model DiT-XL/2 --steps 10 --warmup 7 --batch-size "$BATCH" --json "$OUT/bf16_$BATCH.json"
recipe=${BIG%%:*}; layers=${BIG#*:}
$PY -m dit.benchmark --model DiT-XL/2 --steps 10 --warmup 7 --batch-size "$BATCH" --float8 "$recipe" \
  --float8-layers ${layers//,/ } --json "$OUT/fp8_${BATCH}_${recipe}_${layers//,/_}.json"
